-- keel's SQLite schema, one section per step. database._migrate runs bootstrap every time and each later
-- section once, in order, under BEGIN IMMEDIATE, and records in keel_schema how far the file has got.
-- Never edit a released section: add a new one (store_v3, ...). Statements are split on ';'.

-- bootstrap --
-- The table recording which schema version each keel component has reached.
CREATE TABLE IF NOT EXISTS keel_schema (
    component TEXT PRIMARY KEY,
    version   INTEGER NOT NULL
);

-- store_v1 --
-- The versioned store: one current row per key, plus the last versions of each key.

-- The current version of each key. value is JSON text; NULL marks a tombstone, which keeps the
-- version counter so that a deleted and re-created key never reuses a version number.
CREATE TABLE IF NOT EXISTS keel_kv (
    key        TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    value      TEXT,
    written_at TEXT NOT NULL,
    writer     TEXT NOT NULL
);

-- Past versions, the current one included, trimmed to the store's history limit on every write.
CREATE TABLE IF NOT EXISTS keel_kv_history (
    key        TEXT NOT NULL,
    version    INTEGER NOT NULL,
    value      TEXT,
    written_at TEXT NOT NULL,
    writer     TEXT NOT NULL,
    PRIMARY KEY (key, version)
) WITHOUT ROWID;

-- runtime_v2 --
-- The broker: workflow instances with their lease and state, their inboxes, state history and turn records.

-- One row per workflow instance, created by the first message sent to it.
CREATE TABLE keel_instances (
    app              TEXT NOT NULL,
    workflow         TEXT NOT NULL,
    workflow_id      TEXT NOT NULL,
    -- Raised by one on every claim, never lowered: a commit under an older token is refused.
    fencing_token    INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    -- Microseconds since the Unix epoch by this machine's clock (an integer compares exactly); NULL: no lease.
    lease_expires_us INTEGER,
    -- 1 after a failed turn: never claimed until a retry or skip clears it.
    paused           INTEGER NOT NULL DEFAULT 0,
    -- The committed state (JSON text) and its version; NULL and 0 before the first committed turn.
    state            TEXT,
    state_version    INTEGER NOT NULL DEFAULT 0,
    state_written_at TEXT,
    state_writer     TEXT,
    -- seq of the oldest pending message, NULL when the inbox is empty: what claims order and filter by.
    next_seq         INTEGER,
    PRIMARY KEY (app, workflow, workflow_id)
) WITHOUT ROWID;

-- The instances a claim may take, oldest pending message first.
CREATE INDEX keel_instances_ready ON keel_instances (app, next_seq) WHERE next_seq IS NOT NULL AND paused = 0;

-- Every message sent, in one sequence for the whole file: seq orders each inbox and the claims.
CREATE TABLE keel_messages (
    -- AUTOINCREMENT: a seq is never reused, even if the newest messages are deleted one day.
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    app             TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    workflow        TEXT NOT NULL,
    workflow_id     TEXT NOT NULL,
    payload         TEXT NOT NULL,
    idempotency_key TEXT,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- The state version the message's turn committed.
    state_version   INTEGER,
    error           TEXT,
    sent_at         TEXT NOT NULL,
    completed_at    TEXT,
    UNIQUE (app, message_id),
    -- NULL keys are distinct in a UNIQUE constraint, so messages without a key never collide.
    UNIQUE (app, workflow, workflow_id, idempotency_key)
);

-- An instance's pending messages in order: the next one to run.
CREATE INDEX keel_messages_pending ON keel_messages (app, workflow, workflow_id, seq) WHERE status = 'pending';

-- The newest message of an app, which idle workers poll.
CREATE INDEX keel_messages_app ON keel_messages (app, seq);

-- The last versions of each instance's state, the current one included, trimmed on every commit.
CREATE TABLE keel_state_history (
    app         TEXT NOT NULL,
    workflow    TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    version     INTEGER NOT NULL,
    state       TEXT NOT NULL,
    written_at  TEXT NOT NULL,
    writer      TEXT NOT NULL,
    PRIMARY KEY (app, workflow, workflow_id, version)
) WITHOUT ROWID;

-- One row per turn that ended, committed or failed.
CREATE TABLE keel_turns (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    app             TEXT NOT NULL,
    workflow        TEXT NOT NULL,
    workflow_id     TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    worker          TEXT NOT NULL,
    attempt         INTEGER NOT NULL,
    fencing_token   INTEGER NOT NULL,
    version_read    INTEGER NOT NULL,
    version_written INTEGER,
    started_at      TEXT NOT NULL,
    duration_s      REAL NOT NULL,
    outcome         TEXT NOT NULL,
    error           TEXT
);

CREATE INDEX keel_turns_instance ON keel_turns (app, workflow, workflow_id, id);

-- runtime_v3 --
-- Steps done once, retries and dead letters: the 'skipped' status, when a message failed, and step results.

-- SQLite cannot change a CHECK constraint in place, so keel_messages is rebuilt (SQLite's documented way):
-- a new table allowing 'skipped' and holding failed_us, every row copied with its seq, the AUTOINCREMENT
-- counter carried over, the old table dropped, the new one renamed and its indexes made again.
CREATE TABLE keel_messages_v3 (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    app             TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    workflow        TEXT NOT NULL,
    workflow_id     TEXT NOT NULL,
    payload         TEXT NOT NULL,
    idempotency_key TEXT,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed', 'skipped')),
    -- Deliveries of the message so far; kept across retries, reset to 0 when a dead letter is retried.
    attempts        INTEGER NOT NULL DEFAULT 0,
    state_version   INTEGER,
    error           TEXT,
    sent_at         TEXT NOT NULL,
    completed_at    TEXT,
    -- When the message's turn failed for good (dead-lettered), in microseconds since the Unix epoch.
    failed_us       INTEGER,
    UNIQUE (app, message_id),
    UNIQUE (app, workflow, workflow_id, idempotency_key)
);

-- Failed messages of version 2 failed when they completed: completed_at, a UTC ISO time written by keel,
-- turned into exact microseconds (whole seconds, plus the six digits after the point when there are any).
INSERT INTO keel_messages_v3 (
    seq, app, message_id, workflow, workflow_id, payload, idempotency_key, status, attempts, state_version,
    error, sent_at, completed_at, failed_us
)
SELECT seq, app, message_id, workflow, workflow_id, payload, idempotency_key, status, attempts, state_version,
    error, sent_at, completed_at,
    CASE WHEN status = 'failed' THEN
        CAST(strftime('%s', coalesce(completed_at, sent_at)) AS INTEGER) * 1000000
        + CASE WHEN substr(coalesce(completed_at, sent_at), 20, 1) = '.'
            THEN CAST(substr(coalesce(completed_at, sent_at), 21, 6) AS INTEGER) ELSE 0 END
    END
FROM keel_messages
ORDER BY seq;

-- Carry the seq counter over, so that no seq is ever handed out twice.
DELETE FROM sqlite_sequence WHERE name = 'keel_messages_v3';

INSERT INTO sqlite_sequence (name, seq)
SELECT 'keel_messages_v3', top FROM (
    SELECT max(seq) AS top FROM (
        SELECT seq FROM sqlite_sequence WHERE name = 'keel_messages'
        UNION ALL SELECT max(seq) FROM keel_messages_v3
    )
)
WHERE top IS NOT NULL;

DROP TABLE keel_messages;

ALTER TABLE keel_messages_v3 RENAME TO keel_messages;

-- An instance's pending messages in order: the next one to run.
CREATE INDEX keel_messages_pending ON keel_messages (app, workflow, workflow_id, seq) WHERE status = 'pending';

-- The newest message of an app, which idle workers poll.
CREATE INDEX keel_messages_app ON keel_messages (app, seq);

-- An app's dead letters, newest failure first.
CREATE INDEX keel_messages_failed ON keel_messages (app, failed_us) WHERE status = 'failed';

-- Step results recorded under a lease, replayed to every later claim of their message instead of running again.
-- The first result recorded under a name stands. Kept for now: nothing deletes them yet.
CREATE TABLE keel_steps (
    app         TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    name        TEXT NOT NULL,
    -- The step's result, JSON text.
    result      TEXT NOT NULL,
    worker      TEXT NOT NULL,
    duration_s  REAL NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (app, message_id, name)
) WITHOUT ROWID;

-- runtime_v4 --
-- Durable timers, pruning and deleting instances: when each message was sent, becomes visible and finished,
-- when each turn started (exact microseconds that SQL compares, next to the ISO texts kept for reading), the
-- next message's visible time on each instance, and tombstones of deleted instances.

-- Microseconds since the Unix epoch of a UTC ISO time written by keel: whole seconds, plus the six digits
-- after the point when there are any (Python leaves them out when they are all zero). Spelled out in each
-- UPDATE below, as SQLite 3.40 has no unixepoch(..., 'subsec').
ALTER TABLE keel_messages ADD COLUMN sent_us INTEGER NOT NULL DEFAULT 0;

-- When the message may first be claimed: sent_us plus its delay. An inbox runs in (visible_us, seq) order.
ALTER TABLE keel_messages ADD COLUMN visible_us INTEGER NOT NULL DEFAULT 0;

-- When a done or skipped message finished, which pruning compares with its cut-off.
ALTER TABLE keel_messages ADD COLUMN finished_us INTEGER;

UPDATE keel_messages
SET sent_us = CAST(strftime('%s', sent_at) AS INTEGER) * 1000000
    + CASE WHEN substr(sent_at, 20, 1) = '.' THEN CAST(substr(sent_at, 21, 6) AS INTEGER) ELSE 0 END;

-- Messages of version 3 were visible as soon as they were sent, and finished when they completed.
UPDATE keel_messages
SET visible_us = sent_us,
    finished_us = CASE WHEN status IN ('done', 'skipped') THEN
        CAST(strftime('%s', coalesce(completed_at, sent_at)) AS INTEGER) * 1000000
        + CASE WHEN substr(coalesce(completed_at, sent_at), 20, 1) = '.'
            THEN CAST(substr(coalesce(completed_at, sent_at), 21, 6) AS INTEGER) ELSE 0 END
    END;

-- An instance's pending messages in the order they run: the first one visible, then the first one sent.
DROP INDEX keel_messages_pending;

CREATE INDEX keel_messages_pending ON keel_messages (app, workflow, workflow_id, visible_us, seq)
WHERE status = 'pending';

-- An app's finished messages, oldest finish first: what pruning looks through.
CREATE INDEX keel_messages_finished ON keel_messages (app, finished_us) WHERE status IN ('done', 'skipped');

-- When the turn started, which pruning compares with its cut-off.
ALTER TABLE keel_turns ADD COLUMN started_us INTEGER NOT NULL DEFAULT 0;

UPDATE keel_turns
SET started_us = CAST(strftime('%s', started_at) AS INTEGER) * 1000000
    + CASE WHEN substr(started_at, 20, 1) = '.' THEN CAST(substr(started_at, 21, 6) AS INTEGER) ELSE 0 END;

CREATE INDEX keel_turns_started ON keel_turns (app, started_us);

-- visible_us of the message next_seq points at (NULL with it): claims take instances in (next_visible_us,
-- next_seq) order, and only once next_visible_us has come.
ALTER TABLE keel_instances ADD COLUMN next_visible_us INTEGER;

-- 1 once the instance was deleted: the row stays as a tombstone, nothing else of it, so that its fencing token
-- keeps rising if the instance is sent a message again and no token is ever handed out twice for it.
ALTER TABLE keel_instances ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;

-- Point every inbox at its next message by the new order (the same one as before, as visible_us = sent_us).
UPDATE keel_instances
SET (next_seq, next_visible_us) = (
    SELECT m.seq, m.visible_us FROM keel_messages AS m
    WHERE m.app = keel_instances.app AND m.workflow = keel_instances.workflow
        AND m.workflow_id = keel_instances.workflow_id AND m.status = 'pending'
    ORDER BY m.visible_us, m.seq
    LIMIT 1
);

-- The instances a claim may take, the first visible next message first.
DROP INDEX keel_instances_ready;

CREATE INDEX keel_instances_ready ON keel_instances (app, next_visible_us, next_seq)
WHERE next_seq IS NOT NULL AND paused = 0;

-- Refuse the writes of a process still running keel code of schema version 3 on this file: it would send
-- messages with no visible time and leave inboxes pointing at a message with none, which no claim ever takes.
-- Such a process's sends, turn records (so its commits, failures and retries) and inbox moves fail instead,
-- loudly; its leases run out and upgraded workers take over. Code of this version always sets these columns.
CREATE TRIGGER keel_messages_need_times BEFORE INSERT ON keel_messages
WHEN NEW.sent_us = 0
BEGIN
    SELECT RAISE(ABORT, 'keel: this SQLite file is at a newer schema version; upgrade keel-runtime in this process');
END;

CREATE TRIGGER keel_turns_need_times BEFORE INSERT ON keel_turns
WHEN NEW.started_us = 0
BEGIN
    SELECT RAISE(ABORT, 'keel: this SQLite file is at a newer schema version; upgrade keel-runtime in this process');
END;

CREATE TRIGGER keel_instances_need_times BEFORE UPDATE OF next_seq ON keel_instances
WHEN NEW.next_seq IS NOT NULL AND NEW.next_visible_us IS NULL
BEGIN
    SELECT RAISE(ABORT, 'keel: this SQLite file is at a newer schema version; upgrade keel-runtime in this process');
END;

-- runtime_v5 --
-- Events: each app's event log, which handler deliveries (ordinary messages to instances 'on/HANDLER' /
-- EVENT_ID) are sent with, and the idempotency keys of published events.

-- One row per event appended to an app's log, by a commit or by a publish.
CREATE TABLE keel_events (
    -- AUTOINCREMENT: a seq is never reused, so each app's events are ordered by it, newest last.
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    app                TEXT NOT NULL,
    event_id           TEXT NOT NULL,
    type               TEXT NOT NULL,
    -- The event, JSON text.
    payload            TEXT NOT NULL,
    -- The handlers it was delivered to, a JSON array of their names in delivery order.
    handlers           TEXT NOT NULL,
    -- The instance whose turn emitted it and that turn's message; all NULL when it was published.
    source_app         TEXT,
    source_workflow    TEXT,
    source_workflow_id TEXT,
    source_message_id  TEXT,
    idempotency_key    TEXT,
    -- Microseconds since the Unix epoch by this machine's clock, read after the write lock was taken.
    published_us       INTEGER NOT NULL,
    UNIQUE (app, event_id)
);

-- An app's log, newest first.
CREATE INDEX keel_events_app ON keel_events (app, seq);

-- An app's events, oldest first: what pruning looks through.
CREATE INDEX keel_events_published ON keel_events (app, published_us);

-- The publish idempotency keys of an app: an event whose key is taken appends nothing. The key lives on the event
-- row, so it goes when the event is pruned.
CREATE UNIQUE INDEX keel_events_key ON keel_events (app, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- runtime_v6 --
-- What each instance holds, stored with its row by the send that creates it: a workflow's instance, or a handler's
-- delivery of one event (one message, no state; pruned whole once that message goes, its id never used again).
-- Engines go by this column, never by the instance's name.
ALTER TABLE keel_instances ADD COLUMN kind TEXT NOT NULL DEFAULT 'workflow' CHECK (kind IN ('workflow', 'delivery'));

-- The deliveries already stored are exactly the instances of the pseudo-workflows 'on/HANDLER' (user workflow names
-- cannot contain '/'): the one place the name is read, once. A process still running version 5 code on this file
-- creates its instances as workflows (the default): prune then keeps such a delivery's row, as version 5 kept every
-- workflow's, which costs a row and loses nothing.
UPDATE keel_instances SET kind = 'delivery' WHERE substr(workflow, 1, 3) = 'on/';

-- runtime_v7 --
-- Claims look for ready instances workflow by workflow, each in one range of this index. keel_instances_ready orders
-- all of an app's workflows together, so a claim for some of them stepped over every ready instance of the others
-- (the backlog of a pool of workers that is down, or of a handler that runs elsewhere), at every claim.
CREATE INDEX keel_instances_ready_by_workflow ON keel_instances (app, workflow, next_visible_us, next_seq)
WHERE next_seq IS NOT NULL AND paused = 0;

-- The failed message pausing an instance, which retrying or skipping a dead letter looks up: without it, the lookup
-- walked all of the app's messages in seq order (keel_messages_app) until it met the instance's failed one.
CREATE INDEX keel_messages_failed_by_instance ON keel_messages (app, workflow, workflow_id, seq) WHERE status = 'failed';

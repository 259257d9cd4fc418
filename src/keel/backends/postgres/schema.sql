-- keel's PostgreSQL schema, one section per step; each runs once, in its own migration transaction.
--
-- Table names are unqualified on purpose: the connection's search_path (the URL's
-- options=-csearch_path=...) picks the schema, so several apps or tests can share one database.
-- Sections are applied in order by keel.backends.postgres.store._migrate; never edit a released
-- section, add a new one (store_v2, ...) and keel_schema records how far a database has got.

-- bootstrap --
-- The table recording which schema version each keel component has reached.
CREATE TABLE IF NOT EXISTS keel_schema (
    component   text PRIMARY KEY,
    version     integer NOT NULL,
    migrated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- store_v1 --
-- The versioned store: one current row per key, plus the last versions of each key.
CREATE TABLE keel_kv (
    key        text PRIMARY KEY,
    -- Grows by one per write, a delete included; a tombstone keeps it, so versions are never reused.
    version    bigint NOT NULL CHECK (version >= 1),
    -- The JSON text exactly as keel encoded it (not jsonb, which would reorder keys); NULL is a tombstone.
    value      text,
    written_at timestamptz NOT NULL,
    writer     text NOT NULL
);

CREATE TABLE keel_kv_history (
    key        text NOT NULL,
    version    bigint NOT NULL,
    value      text,
    written_at timestamptz NOT NULL,
    writer     text NOT NULL,
    -- One entry per version; the index also serves "newest first" reads and the trimming of old entries.
    PRIMARY KEY (key, version)
);

-- runtime_v1 --
-- The runtime: workflow instances (lease, fencing token, committed state), their inboxes, state history and turns.
CREATE TABLE keel_instances (
    app              text NOT NULL,
    workflow         text NOT NULL,
    workflow_id      text NOT NULL,
    -- Raised by one at every claim and never lowered, so a token names one lease for ever (G2).
    fencing_token    bigint NOT NULL DEFAULT 0,
    lease_owner      text,
    -- Set from the server's clock_timestamp() only, never from a worker's clock; NULL when nobody holds a lease.
    lease_expires_at timestamptz,
    -- A failed turn pauses the instance: its messages wait, none is claimed.
    paused           boolean NOT NULL DEFAULT false,
    -- The committed state as keel encoded it (NULL and version 0 before the first turn).
    state            text,
    state_version    bigint NOT NULL DEFAULT 0,
    state_written_at timestamptz,
    state_writer     text,
    -- The seq of the oldest pending message (the next turn to run), NULL when the inbox is empty.
    next_seq         bigint,
    PRIMARY KEY (app, workflow, workflow_id)
);

-- What claim scans: instances with work, oldest first; live leases are filtered out as the scan goes.
CREATE INDEX keel_instances_ready ON keel_instances (app, next_seq) WHERE next_seq IS NOT NULL AND NOT paused;

CREATE TABLE keel_state_history (
    app         text NOT NULL,
    workflow    text NOT NULL,
    workflow_id text NOT NULL,
    version     bigint NOT NULL,
    state       text NOT NULL,
    written_at  timestamptz NOT NULL,
    writer      text NOT NULL,
    PRIMARY KEY (app, workflow, workflow_id, version),
    FOREIGN KEY (app, workflow, workflow_id) REFERENCES keel_instances
);

CREATE TABLE keel_messages (
    app             text NOT NULL,
    message_id      text NOT NULL,
    -- The send order. Sends to one instance take its row lock before drawing a number, so within an inbox the
    -- numbers follow the commit order.
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    workflow        text NOT NULL,
    workflow_id     text NOT NULL,
    payload         text NOT NULL,
    idempotency_key text,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    -- The state version the message's turn committed.
    state_version   bigint,
    error           text,
    sent_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at     timestamptz,
    PRIMARY KEY (app, message_id),
    FOREIGN KEY (app, workflow, workflow_id) REFERENCES keel_instances
);

-- One message per idempotency key and instance, across every process that sends.
CREATE UNIQUE INDEX keel_messages_idempotency ON keel_messages (app, workflow, workflow_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- An instance's inbox in order: finds the next pending message when a turn completes.
CREATE INDEX keel_messages_inbox ON keel_messages (app, workflow, workflow_id, seq) WHERE status = 'pending';

CREATE TABLE keel_turns (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app             text NOT NULL,
    workflow        text NOT NULL,
    workflow_id     text NOT NULL,
    message_id      text NOT NULL,
    worker          text NOT NULL,
    attempt         integer NOT NULL,
    fencing_token   bigint NOT NULL,
    version_read    bigint NOT NULL,
    version_written bigint,
    started_at      timestamptz NOT NULL,
    duration_s      double precision NOT NULL,
    outcome         text NOT NULL,
    error           text,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    FOREIGN KEY (app, workflow, workflow_id) REFERENCES keel_instances
);

-- An instance's turns, newest first.
CREATE INDEX keel_turns_instance ON keel_turns (app, workflow, workflow_id, id);

-- runtime_v2 --
-- Steps done once, retries after a delay, dead letters that can be retried or skipped.
-- A step's result, recorded once per (message, name) by the attempt that ran it; later attempts replay it.
CREATE TABLE keel_steps (
    app           text NOT NULL,
    message_id    text NOT NULL,
    name          text NOT NULL,
    -- The result's JSON text exactly as keel encoded it; the first one recorded stands.
    result        text NOT NULL,
    worker        text NOT NULL,
    fencing_token bigint NOT NULL,
    duration_s    double precision NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Also what a claim reads: the steps of one message.
    PRIMARY KEY (app, message_id, name),
    -- Steps belong to their message: whatever deletes messages one day takes their steps along.
    FOREIGN KEY (app, message_id) REFERENCES keel_messages ON DELETE CASCADE
);

-- A dead letter can now be skipped. A failed message's finished_at is when it failed (fail_turn has always set it),
-- so messages that failed before this step are dead letters with a failure time too.
ALTER TABLE keel_messages
    DROP CONSTRAINT keel_messages_status_check,
    ADD CONSTRAINT keel_messages_status_check CHECK (status IN ('pending', 'done', 'failed', 'skipped'));

-- The dead letters of an app, newest failure first.
CREATE INDEX keel_messages_dead ON keel_messages (app, finished_at DESC) WHERE status = 'failed';

-- runtime_v3 --
-- Durable timers (a message becomes visible at its visible_at), pruning of finished records, deleting instances.
-- Filling visible_at rewrites keel_messages: however big it is, that must not be cut off by the URL's query timeout.
SET LOCAL statement_timeout = 0;

-- When a message becomes claimable: sent_at plus the send's delay, by the server's clock. Messages sent before this
-- step had no delay.
ALTER TABLE keel_messages ADD COLUMN visible_at timestamptz;
UPDATE keel_messages SET visible_at = sent_at;
ALTER TABLE keel_messages ALTER COLUMN visible_at SET NOT NULL;

-- An instance's next message is now its pending message with the smallest (visible_at, seq), not the smallest seq;
-- a paused instance's next message stays its failed one. first_token is the fencing token the instance was
-- (re)created with: a claim at or below it was made before the instance was deleted.
ALTER TABLE keel_instances
    ADD COLUMN next_visible_at timestamptz,
    ADD COLUMN first_token bigint NOT NULL DEFAULT 0;

UPDATE keel_instances AS i
   SET next_visible_at = m.visible_at
  FROM keel_messages AS m
 WHERE i.paused AND m.seq = i.next_seq;

UPDATE keel_instances AS i
   SET (next_visible_at, next_seq) = (
           SELECT m.visible_at, m.seq
             FROM keel_messages AS m
            WHERE m.app = i.app AND m.workflow = i.workflow AND m.workflow_id = i.workflow_id AND m.status = 'pending'
            ORDER BY m.visible_at, m.seq
            LIMIT 1)
 WHERE NOT i.paused AND i.next_seq IS NOT NULL;

ALTER TABLE keel_instances
    ADD CONSTRAINT keel_instances_next_check CHECK ((next_seq IS NULL) = (next_visible_at IS NULL));

-- What claim scans: instances with work in the order their next messages became visible; the scan stops at the
-- first one not visible yet, and filters out live leases as it goes.
DROP INDEX keel_instances_ready;
CREATE INDEX keel_instances_ready ON keel_instances (app, next_visible_at, next_seq)
    WHERE next_seq IS NOT NULL AND NOT paused;

-- An instance's inbox in the order its messages become visible: finds the next one when a turn completes.
DROP INDEX keel_messages_inbox;
CREATE INDEX keel_messages_inbox ON keel_messages (app, workflow, workflow_id, visible_at, seq)
    WHERE status = 'pending';

-- What prune deletes: an app's finished messages by finish time, and its turn records by start time.
CREATE INDEX keel_messages_finished ON keel_messages (app, finished_at) WHERE status IN ('done', 'skipped');
CREATE INDEX keel_turns_started ON keel_turns (app, started_at);

-- The last fencing token of each deleted instance, until a send creates it again and takes the token over: so a
-- token is never handed out twice for one instance id, whatever claims of the deleted one are still around.
CREATE TABLE keel_instance_tombstones (
    app           text NOT NULL,
    workflow      text NOT NULL,
    workflow_id   text NOT NULL,
    fencing_token bigint NOT NULL,
    deleted_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (app, workflow, workflow_id)
);

-- runtime_v4 --
-- Events: each app's log of published events (by publish() or with a turn's commit), deduplicated by event id and
-- by idempotency key. Their deliveries are ordinary messages to instances on/HANDLER / EVENT_ID, which prune deletes
-- whole once done. Indexing keel_messages must not be cut off by the URL's query timeout, however big it is.
SET LOCAL statement_timeout = 0;

-- An instance's messages, whatever their status: what deleting an instance looks up, the foreign key's check
-- included (without it, each instance deleted scans the whole table; prune deletes finished deliveries by the
-- thousand).
CREATE INDEX keel_messages_instance ON keel_messages (app, workflow, workflow_id);

CREATE TABLE keel_events (
    app                text NOT NULL,
    event_id           text NOT NULL,
    -- The log's order: numbers grow with every event appended, in any app (gaps are possible).
    seq                bigint GENERATED ALWAYS AS IDENTITY,
    type               text NOT NULL,
    -- The event's JSON text exactly as keel encoded it.
    payload            text NOT NULL,
    -- The handlers it was delivered to, in order: a JSON array of their names.
    handlers           jsonb NOT NULL CHECK (jsonb_typeof(handlers) = 'array'),
    -- The instance whose turn emitted it, and that turn's message; all NULL when it was published.
    source_app         text,
    source_workflow    text,
    source_workflow_id text,
    source_message_id  text,
    idempotency_key    text,
    -- By the server's clock, like a message's sent_at.
    published_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (app, event_id),
    CHECK ((source_workflow IS NULL) = (source_app IS NULL) AND (source_workflow_id IS NULL) = (source_app IS NULL))
);

-- One event per idempotency key and app, while the event is in the log.
CREATE UNIQUE INDEX keel_events_idempotency ON keel_events (app, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- An app's log, newest first.
CREATE INDEX keel_events_log ON keel_events (app, seq);

-- What prune deletes: an app's events by publish time.
CREATE INDEX keel_events_published ON keel_events (app, published_at);

-- runtime_v5 --
-- What each instance holds, stored with its row by the send that creates it: a workflow's instance, or a handler's
-- delivery of one event (one message, no state; pruned whole once that message goes, its id never used again).
-- The engine goes by this column, never by the instance's name.
ALTER TABLE keel_instances
    ADD COLUMN kind text NOT NULL DEFAULT 'workflow' CHECK (kind IN ('workflow', 'delivery'));

-- The deliveries already stored are exactly the instances of the pseudo-workflows 'on/HANDLER' (user workflow names
-- cannot contain '/'): the one place the name is read, once. A process still running older code creates its
-- instances as workflows (the default): prune keeps such a delivery's row, as that code kept every one, which costs a
-- row and loses nothing.
UPDATE keel_instances SET kind = 'delivery' WHERE starts_with(workflow, 'on/');

-- runtime_v6 --
-- Whether a client waits for the message to end (client.wait): the commit, dead letter or skip that ends it then
-- NOTIFYs, in its own transaction. Only those notify, because a commit with a NOTIFY takes a lock of the whole
-- database until it has committed, which would make every commit wait for the one before. A constant default is
-- stored in the catalogue only: adding the column rewrites nothing.
ALTER TABLE keel_messages ADD COLUMN waited boolean NOT NULL DEFAULT false;

-- Claims look for ready instances workflow by workflow, each in one range of this index. keel_instances_ready orders
-- all of an app's workflows together, so a claim for some of them stepped over every ready instance of the others
-- (the backlog of a pool of workers that is down, or of a handler that runs elsewhere), at every claim. Indexing
-- keel_instances must not be cut off by the URL's query timeout, however big it is.
SET LOCAL statement_timeout = 0;

CREATE INDEX keel_instances_ready_by_workflow ON keel_instances (app, workflow, next_visible_at, next_seq)
    WHERE next_seq IS NOT NULL AND NOT paused;

-- The broker's statements (keel.backends.sqlite.broker). Every write runs inside one BEGIN IMMEDIATE
-- transaction opened by the caller; times :now_us and :expires_us are microseconds since the Unix epoch,
-- read from this machine's clock after the write lock was taken.

-- insert_message --
-- Append a message; no row comes back when its id or its (instance, idempotency key) was used before.
INSERT INTO keel_messages (
    app, message_id, workflow, workflow_id, payload, idempotency_key, sent_at, sent_us, visible_us
)
VALUES (:app, :message_id, :workflow, :workflow_id, :payload, :idempotency_key, :sent_at, :sent_us, :visible_us)
ON CONFLICT DO NOTHING
RETURNING seq

-- message_by_idempotency_key --
-- The id and payload of the message an instance received under an idempotency key.
SELECT message_id, payload FROM keel_messages
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND idempotency_key = :idempotency_key

-- enqueue --
-- Create the instance on its first message, of the message's kind (or bring a deleted one back, keeping its kind),
-- and point its inbox at the new message if the inbox was empty or the new message becomes visible before its next
-- one (a later seq never wins a tie). Every SET reads the row as it was before the update.
INSERT INTO keel_instances (app, workflow, workflow_id, kind, next_seq, next_visible_us)
VALUES (:app, :workflow, :workflow_id, :kind, :seq, :visible_us)
ON CONFLICT (app, workflow, workflow_id) DO UPDATE
    SET deleted = 0,
        next_seq = CASE
            WHEN keel_instances.next_seq IS NULL OR excluded.next_visible_us < keel_instances.next_visible_us
            THEN excluded.next_seq ELSE keel_instances.next_seq END,
        next_visible_us = CASE
            WHEN keel_instances.next_seq IS NULL OR excluded.next_visible_us < keel_instances.next_visible_us
            THEN excluded.next_visible_us ELSE keel_instances.next_visible_us END

-- latest_seq --
-- The newest message sent to an app, 0 if none: idle workers compare it with what they saw last.
SELECT coalesce(max(seq), 0) FROM keel_messages WHERE app = :app

-- work_signals --
-- What an idle worker polls: the app's newest seq (0 if none), and the first time after :since_us at which an
-- unpaused instance's next message becomes visible (NULL if none): a delayed message coming due sends nothing.
SELECT
    (SELECT coalesce(max(seq), 0) FROM keel_messages WHERE app = :app),
    (
        SELECT min(next_visible_us) FROM keel_instances
        WHERE app = :app AND next_seq IS NOT NULL AND paused = 0 AND next_visible_us > :since_us
    )

-- ready_instances --
-- Instances of one workflow whose next message is visible, not paused and not under a live lease (nor held by a
-- retry), in the order of their next messages (first visible, first sent), with that order's keys. One range of
-- keel_instances_ready_by_workflow: the ready instances of other workflows are never stepped over.
SELECT next_visible_us, next_seq, workflow, workflow_id FROM keel_instances
WHERE app = :app AND workflow = :workflow AND next_seq IS NOT NULL AND paused = 0 AND next_visible_us <= :now_us
    AND (lease_expires_us IS NULL OR lease_expires_us <= :now_us)
ORDER BY next_visible_us, next_seq
LIMIT :limit

-- lease_instance --
-- Lease an instance under a fresh fencing token; returns the token, its next message's seq and its state.
UPDATE keel_instances
SET fencing_token = fencing_token + 1, lease_owner = :worker, lease_expires_us = :expires_us
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id
RETURNING fencing_token, next_seq, state, state_version

-- start_attempt --
-- Count one more delivery of a message; returns its id, payload and attempt number.
UPDATE keel_messages SET attempts = attempts + 1 WHERE seq = :seq
RETURNING message_id, payload, attempts

-- message_steps --
-- The step results recorded for a message by its earlier attempts, replayed to the claim.
SELECT name, result FROM keel_steps WHERE app = :app AND message_id = :message_id

-- lease_of --
-- An instance's fencing token, lease owner (NULL once released), lease expiry and tombstone flag, for the fence.
SELECT fencing_token, lease_owner, lease_expires_us, deleted FROM keel_instances
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id

-- renew_lease --
-- Extend a lease still held under a token; no row comes back if the token moved on, or the lease was released
-- (a commit, failure, release or retry clears the owner) or expired.
UPDATE keel_instances SET lease_expires_us = :expires_us
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id
    AND fencing_token = :token AND lease_owner IS NOT NULL AND lease_expires_us > :now_us
RETURNING fencing_token

-- release_lease --
-- Give a lease back if it is still held under the token; the message stays pending. A released lease (owner
-- NULL) is left alone, so that releasing after a retry cannot cut the retry's hold short.
UPDATE keel_instances SET lease_owner = NULL, lease_expires_us = NULL
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND fencing_token = :token
    AND lease_owner IS NOT NULL

-- hold_instance --
-- Release a lease after a failed attempt that will be retried, but keep the instance from every claim until
-- :hold_until_us (no owner, expiry in the future); its message stays pending and next in line.
UPDATE keel_instances SET lease_owner = NULL, lease_expires_us = :hold_until_us
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND fencing_token = :token

-- message_is_pending --
-- A row if the message is still pending.
SELECT 1 FROM keel_messages WHERE app = :app AND message_id = :message_id AND status = 'pending'

-- record_step --
-- Record a step's result for a message; a name already recorded keeps its first result.
INSERT INTO keel_steps (app, message_id, name, result, worker, duration_s, recorded_at)
VALUES (:app, :message_id, :name, :result, :worker, :duration_s, :recorded_at)
ON CONFLICT (app, message_id, name) DO NOTHING

-- complete_message --
-- Mark a pending message done at the state version its turn wrote.
UPDATE keel_messages
SET status = 'done', state_version = :version, completed_at = :completed_at, finished_us = :now_us
WHERE app = :app AND message_id = :message_id AND status = 'pending'
RETURNING seq

-- fail_message --
-- Mark a pending message failed (dead-lettered) with the turn's error and the time it failed.
UPDATE keel_messages SET status = 'failed', error = :error, completed_at = :completed_at, failed_us = :now_us
WHERE app = :app AND message_id = :message_id AND status = 'pending'
RETURNING seq

-- write_state --
-- Compare-and-swap the instance's state from the version the turn read, release the lease and move the inbox
-- on to its next pending message (run after the turn's message left 'pending').
UPDATE keel_instances
SET state = :state, state_version = :version, state_written_at = :written_at, state_writer = :writer,
    lease_owner = NULL, lease_expires_us = NULL,
    (next_seq, next_visible_us) = (
        SELECT seq, visible_us FROM keel_messages
        WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND status = 'pending'
        ORDER BY visible_us, seq
        LIMIT 1
    )
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id
    AND fencing_token = :token AND state_version = :version_read
RETURNING state_version

-- release_unchanged --
-- What write_state does for a handler delivery's acknowledgement, which writes no state: check the fence and the
-- version the turn read, release the lease and move the inbox on to its next pending message.
UPDATE keel_instances
SET lease_owner = NULL, lease_expires_us = NULL,
    (next_seq, next_visible_us) = (
        SELECT seq, visible_us FROM keel_messages
        WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND status = 'pending'
        ORDER BY visible_us, seq
        LIMIT 1
    )
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id
    AND fencing_token = :token AND state_version = :version_read
RETURNING state_version

-- pause_instance --
-- Pause an instance after a failed turn, release the lease and move the inbox on past the failed message.
UPDATE keel_instances
SET paused = 1, lease_owner = NULL, lease_expires_us = NULL,
    (next_seq, next_visible_us) = (
        SELECT seq, visible_us FROM keel_messages
        WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND status = 'pending'
        ORDER BY visible_us, seq
        LIMIT 1
    )
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND fencing_token = :token

-- append_state_history --
-- Keep a committed state version in the instance's history.
INSERT INTO keel_state_history (app, workflow, workflow_id, version, state, written_at, writer)
VALUES (:app, :workflow, :workflow_id, :version, :state, :written_at, :writer)

-- trim_state_history --
-- Drop the state versions that fall outside the history limit.
DELETE FROM keel_state_history
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND version <= :oldest_dropped

-- record_turn --
-- Record how a turn ended.
INSERT INTO keel_turns (
    app, workflow, workflow_id, message_id, worker, attempt, fencing_token,
    version_read, version_written, started_at, started_us, duration_s, outcome, error
)
VALUES (
    :app, :workflow, :workflow_id, :message_id, :worker, :attempt, :token,
    :version_read, :version_written, :started_at, :started_us, :duration_s, :outcome, :error
)

-- insert_event --
-- Append an event to its app's log; no row comes back when its id, or its idempotency key, is in the log already.
INSERT INTO keel_events (
    app, event_id, type, payload, handlers, source_app, source_workflow, source_workflow_id, source_message_id,
    idempotency_key, published_us
)
VALUES (
    :app, :event_id, :type, :payload, :handlers, :source_app, :source_workflow, :source_workflow_id,
    :source_message_id, :idempotency_key, :published_us
)
ON CONFLICT DO NOTHING
RETURNING seq

-- first_event --
-- The event a repeated publish stands for: itself if it is in the log, else the one published under its key; with
-- its type and payload, which a publish under the key must repeat.
SELECT event_id, type, payload FROM keel_events
WHERE app = :app AND (event_id = :event_id OR idempotency_key = :idempotency_key)
ORDER BY event_id = :event_id DESC
LIMIT 1

-- events --
-- An app's last events, newest first.
SELECT seq, event_id, type, payload, handlers, source_app, source_workflow, source_workflow_id, source_message_id,
    idempotency_key, published_us
FROM keel_events
WHERE app = :app
ORDER BY seq DESC
LIMIT :limit

-- message_info --
-- A message's instance, status, committed version and error.
SELECT workflow, workflow_id, status, state_version, error FROM keel_messages
WHERE app = :app AND message_id = :message_id

-- instance_state --
-- An instance's committed state; no row before its first committed turn.
SELECT state_version, state, state_written_at, state_writer FROM keel_instances
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND state_version > 0

-- turns --
-- An instance's turn records, newest first.
SELECT message_id, worker, attempt, fencing_token, version_read, version_written, started_at, duration_s,
    outcome, error
FROM keel_turns
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id
ORDER BY id DESC
LIMIT :limit

-- dead_letters --
-- An app's dead-lettered messages, newest failure first.
SELECT workflow, workflow_id, message_id, error, attempts, failed_us FROM keel_messages
WHERE app = :app AND status = 'failed'
ORDER BY failed_us DESC, seq DESC
LIMIT :limit

-- dead_letter_of --
-- The failed message that pauses an instance; no row if the instance is unknown or not paused.
SELECT m.message_id FROM keel_instances AS i
JOIN keel_messages AS m ON m.app = i.app AND m.workflow = i.workflow AND m.workflow_id = i.workflow_id
WHERE i.app = :app AND i.workflow = :workflow AND i.workflow_id = :workflow_id AND i.paused = 1
    AND m.status = 'failed'
ORDER BY m.seq
LIMIT 1

-- requeue_dead_letter --
-- Make a dead letter pending again, its error cleared and its attempts reset, to run before the messages after it.
UPDATE keel_messages
SET status = 'pending', error = NULL, attempts = 0, failed_us = NULL, completed_at = NULL
WHERE app = :app AND message_id = :message_id AND status = 'failed'

-- skip_dead_letter --
-- Drop a dead letter on purpose: it is marked skipped and never runs.
UPDATE keel_messages SET status = 'skipped', completed_at = :completed_at, finished_us = :now_us
WHERE app = :app AND message_id = :message_id AND status = 'failed'

-- resume_instance --
-- Un-pause an instance and point its inbox at its next pending message (run after the dead letter was settled):
-- a retried dead letter kept its (visible_us, seq), so it is that one again.
UPDATE keel_instances
SET paused = 0,
    (next_seq, next_visible_us) = (
        SELECT seq, visible_us FROM keel_messages
        WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND status = 'pending'
        ORDER BY visible_us, seq
        LIMIT 1
    )
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND paused = 1

-- prune_messages --
-- Delete up to :limit of an app's done or skipped messages that finished before :finished_us, oldest first,
-- except those whose idempotency key was sent at or after :keys_us (the key must keep deduplicating). The key
-- lives on the message row, so it goes with it. Returns each one's id, to delete its step records, and its
-- instance, to delete a handler delivery's instance with it.
DELETE FROM keel_messages
WHERE seq IN (
    SELECT seq FROM keel_messages
    WHERE app = :app AND status IN ('done', 'skipped') AND finished_us < :finished_us
        AND (idempotency_key IS NULL OR sent_us < :keys_us)
    ORDER BY finished_us
    LIMIT :limit
)
RETURNING message_id, workflow, workflow_id

-- delete_message_steps --
-- Delete the step records of one message.
DELETE FROM keel_steps WHERE app = :app AND message_id = :message_id

-- prune_turns --
-- Delete up to :limit of an app's turn records that started before :finished_us, oldest first.
DELETE FROM keel_turns
WHERE id IN (
    SELECT id FROM keel_turns WHERE app = :app AND started_us < :finished_us ORDER BY started_us LIMIT :limit
)

-- prune_events --
-- Delete up to :limit of an app's events published before :finished_us, oldest first, except those with an
-- idempotency key published at or after :keys_us (the key must keep deduplicating); the key goes with its event.
DELETE FROM keel_events
WHERE seq IN (
    SELECT seq FROM keel_events
    WHERE app = :app AND published_us < :finished_us AND (idempotency_key IS NULL OR published_us < :keys_us)
    ORDER BY published_us
    LIMIT :limit
)

-- delete_instance_steps --
-- Delete the step records of every message of an instance (run before its messages go).
DELETE FROM keel_steps
WHERE app = :app AND message_id IN (
    SELECT message_id FROM keel_messages WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id
)

-- delete_instance_messages --
-- Delete every message of an instance, whatever its status, and with them its idempotency keys.
DELETE FROM keel_messages WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id

-- delete_instance_history --
-- Delete an instance's past states.
DELETE FROM keel_state_history WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id

-- delete_instance_turns --
-- Delete an instance's turn records.
DELETE FROM keel_turns WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id

-- tombstone_instance --
-- Empty a live instance's row down to a tombstone: no state, lease, pause or inbox, only its fencing token, so
-- that a claim made before the deletion is refused and tokens go on rising if the instance is sent a message
-- again. Returns a row only if the instance existed (and was not deleted already).
UPDATE keel_instances
SET deleted = 1, lease_owner = NULL, lease_expires_us = NULL, paused = 0, state = NULL, state_version = 0,
    state_written_at = NULL, state_writer = NULL, next_seq = NULL, next_visible_us = NULL
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND deleted = 0
RETURNING fencing_token

-- instance_kind --
-- What an instance holds: 'workflow' or 'delivery'; no row if it does not exist.
SELECT kind FROM keel_instances WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id

-- drop_instance --
-- Delete an instance's row outright, leaving no tombstone: for handler deliveries, whose ids are never reused.
DELETE FROM keel_instances WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id

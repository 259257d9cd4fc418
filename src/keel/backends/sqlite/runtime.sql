-- The broker's statements (keel.backends.sqlite.broker). Every write runs inside one BEGIN IMMEDIATE
-- transaction opened by the caller; times :now_us and :expires_us are microseconds since the Unix epoch,
-- read from this machine's clock after the write lock was taken.

-- insert_message --
-- Append a message; no row comes back when its id or its (instance, idempotency key) was used before.
INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, idempotency_key, sent_at)
VALUES (:app, :message_id, :workflow, :workflow_id, :payload, :idempotency_key, :sent_at)
ON CONFLICT DO NOTHING
RETURNING seq

-- message_by_idempotency_key --
-- The id of the message an instance received under an idempotency key.
SELECT message_id FROM keel_messages
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND idempotency_key = :idempotency_key

-- enqueue --
-- Create the instance on its first message, or point an empty inbox at the new message.
INSERT INTO keel_instances (app, workflow, workflow_id, next_seq)
VALUES (:app, :workflow, :workflow_id, :seq)
ON CONFLICT (app, workflow, workflow_id) DO UPDATE
    SET next_seq = coalesce(keel_instances.next_seq, excluded.next_seq)

-- latest_seq --
-- The newest message sent to an app, 0 if none: idle workers compare it with what they saw last.
SELECT coalesce(max(seq), 0) FROM keel_messages WHERE app = :app

-- ready_instances --
-- Instances of the asked workflows (:workflows is a JSON array) with a pending message, not paused and not
-- under a live lease, oldest pending message first.
SELECT workflow, workflow_id FROM keel_instances
WHERE app = :app AND next_seq IS NOT NULL AND paused = 0
    AND (lease_expires_us IS NULL OR lease_expires_us <= :now_us)
    AND workflow IN (SELECT value FROM json_each(:workflows))
ORDER BY next_seq
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

-- lease_of --
-- An instance's current fencing token and lease expiry, for the fence check of a commit or failure.
SELECT fencing_token, lease_expires_us FROM keel_instances
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id

-- renew_lease --
-- Extend a lease still held under a token; no row comes back if the token moved on or the lease expired.
UPDATE keel_instances SET lease_expires_us = :expires_us
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id
    AND fencing_token = :token AND lease_expires_us > :now_us
RETURNING fencing_token

-- release_lease --
-- Give a lease back if it is still under the token; the message stays pending.
UPDATE keel_instances SET lease_owner = NULL, lease_expires_us = NULL
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND fencing_token = :token

-- complete_message --
-- Mark a pending message done at the state version its turn wrote.
UPDATE keel_messages SET status = 'done', state_version = :version, completed_at = :completed_at
WHERE app = :app AND message_id = :message_id AND status = 'pending'
RETURNING seq

-- fail_message --
-- Mark a pending message failed with the turn's error.
UPDATE keel_messages SET status = 'failed', error = :error, completed_at = :completed_at
WHERE app = :app AND message_id = :message_id AND status = 'pending'
RETURNING seq

-- write_state --
-- Compare-and-swap the instance's state from the version the turn read, release the lease and move the inbox
-- on to the next pending message (run after the turn's message left 'pending').
UPDATE keel_instances
SET state = :state, state_version = :version, state_written_at = :written_at, state_writer = :writer,
    lease_owner = NULL, lease_expires_us = NULL,
    next_seq = (
        SELECT min(seq) FROM keel_messages
        WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND status = 'pending'
    )
WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id
    AND fencing_token = :token AND state_version = :version_read
RETURNING state_version

-- pause_instance --
-- Pause an instance after a failed turn, release the lease and move the inbox on past the failed message.
UPDATE keel_instances
SET paused = 1, lease_owner = NULL, lease_expires_us = NULL,
    next_seq = (
        SELECT min(seq) FROM keel_messages
        WHERE app = :app AND workflow = :workflow AND workflow_id = :workflow_id AND status = 'pending'
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
    version_read, version_written, started_at, duration_s, outcome, error
)
VALUES (
    :app, :workflow, :workflow_id, :message_id, :worker, :attempt, :token,
    :version_read, :version_written, :started_at, :duration_s, :outcome, :error
)

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

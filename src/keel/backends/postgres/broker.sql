-- The statements of the PostgreSQL broker, loaded by keel.backends._sql; the tables are in schema.sql (runtime_v1 to
-- runtime_v3).
--
-- Writes that must see every message committed before them run in one transaction of two statements: the first
-- locks the instance rows, the second (a fresh snapshot under read committed, taken once the locks are held) reads
-- and writes. One statement alone would read the inbox through a snapshot older than the row it locked. Lease
-- times come from clock_timestamp(), the server's clock. Parameters use psycopg's %(name)s style.
--
-- A lease is live while its token is the instance's, lease_owner is set and lease_expires_at is in the future.
-- Commit, release and retry clear lease_owner; a retry leaves lease_expires_at set, to hold the instance back from
-- claims until then (claims look at lease_expires_at only).
--
-- An instance's next message (next_visible_at, next_seq) is its pending message with the smallest (visible_at, seq);
-- while a failed message pauses the instance, that failed message. Claims take instances whose next message is
-- visible (next_visible_at <= now), in (next_visible_at, next_seq) order.

-- lock_inbox --
-- Create the instance if new and lock its row (the no-op update takes the lock), so that one inbox's sends are serial.
INSERT INTO keel_instances AS i (app, workflow, workflow_id)
VALUES (%(app)s, %(workflow)s, %(workflow_id)s)
ON CONFLICT (app, workflow, workflow_id) DO UPDATE SET next_seq = i.next_seq

-- append --
-- Append a message visible delay_s from now (not if its id or idempotency key was used), queue it first if it becomes
-- visible before the instance's next message, and wake listeners; the id that stands for the message.
-- A tombstone here means lock_inbox has just created the instance again after delete_instance: it takes the
-- tombstone's fencing token over, so that no token of the deleted instance is handed out again.
WITH revived AS (
    DELETE FROM keel_instance_tombstones
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
    RETURNING fencing_token
), sent AS (
    INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, idempotency_key, sent_at, visible_at)
    SELECT %(app)s, %(message_id)s, %(workflow)s, %(workflow_id)s, %(payload)s, %(idempotency_key)s,
           clock.now, clock.now + make_interval(secs => greatest(%(delay_s)s, 0))
      FROM (SELECT clock_timestamp() AS now) AS clock
    ON CONFLICT DO NOTHING
    RETURNING message_id, seq, visible_at
), head AS (
    -- A paused instance keeps its failed message as next: resolve_dead_letter looks at the whole inbox again.
    SELECT sent.seq, sent.visible_at
      FROM sent JOIN keel_instances AS i
           ON i.app = %(app)s AND i.workflow = %(workflow)s AND i.workflow_id = %(workflow_id)s
     WHERE NOT i.paused
       AND (i.next_seq IS NULL OR (sent.visible_at, sent.seq) < (i.next_visible_at, i.next_seq))
), queued AS (
    UPDATE keel_instances AS i
       SET fencing_token = greatest(i.fencing_token, coalesce((SELECT fencing_token FROM revived), 0)),
           first_token = coalesce((SELECT fencing_token FROM revived), i.first_token),
           next_seq = coalesce((SELECT seq FROM head), i.next_seq),
           next_visible_at = coalesce((SELECT visible_at FROM head), i.next_visible_at)
     WHERE i.app = %(app)s AND i.workflow = %(workflow)s AND i.workflow_id = %(workflow_id)s
       AND (EXISTS (SELECT FROM head) OR EXISTS (SELECT FROM revived))
)
SELECT coalesce(
           (SELECT message_id FROM sent),
           (SELECT message_id FROM keel_messages
             WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
               AND idempotency_key = %(idempotency_key)s),
           %(message_id)s),
       -- Delivered at commit; a repeated send wakes listeners for nothing, which is allowed. A timer wakes nobody:
       -- nothing is claimable because of it before it is due, and idle workers poll (has_work counts it once due).
       CASE WHEN %(delay_s)s <= 0 THEN pg_notify(%(channel)s, '') END

-- lock_ready --
-- Lock up to limit claimable instances, earliest visible next message first, skipping rows other claimers hold.
-- The server's now is read once (an InitPlan), so that the index scan on keel_instances_ready stops at it.
SELECT workflow, workflow_id
  FROM keel_instances
 WHERE app = %(app)s AND workflow = ANY(%(workflows)s::text[])
   AND next_seq IS NOT NULL AND NOT paused
   AND next_visible_at <= (SELECT clock_timestamp())
   AND (lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp())
 ORDER BY next_visible_at, next_seq
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED

-- lease --
-- Lease the locked instances under fresh fencing tokens, count an attempt of each one's next message, read its steps.
WITH leased AS (
    UPDATE keel_instances AS i
       SET fencing_token = i.fencing_token + 1,
           lease_owner = %(worker)s,
           lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_s)s)
      FROM unnest(%(workflows)s::text[], %(workflow_ids)s::text[]) AS picked (workflow, workflow_id)
     WHERE i.app = %(app)s AND i.workflow = picked.workflow AND i.workflow_id = picked.workflow_id
    RETURNING i.workflow, i.workflow_id, i.fencing_token, i.lease_expires_at, i.next_visible_at, i.next_seq, i.state,
              i.state_version
), tried AS (
    UPDATE keel_messages AS m
       SET attempts = m.attempts + 1
      FROM leased
     WHERE m.seq = leased.next_seq
    RETURNING m.seq, m.message_id, m.payload, m.attempts
)
SELECT leased.workflow, leased.workflow_id, leased.fencing_token, leased.lease_expires_at,
       tried.message_id, tried.payload, tried.attempts, leased.state, leased.state_version,
       steps.names, steps.results
  FROM leased JOIN tried ON tried.seq = leased.next_seq
       CROSS JOIN LATERAL (
           -- Both arrays in one order, so that names[i] goes with results[i]; NULL when no step was recorded.
           SELECT array_agg(s.name ORDER BY s.name) AS names, array_agg(s.result ORDER BY s.name) AS results
             FROM keel_steps AS s
            WHERE s.app = %(app)s AND s.message_id = tried.message_id
       ) AS steps
 ORDER BY leased.next_visible_at, leased.next_seq

-- renew --
-- Extend the live leases still held under the given tokens (not released); the instances whose lease was extended.
UPDATE keel_instances AS i
   SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_s)s)
  FROM unnest(%(apps)s::text[], %(workflows)s::text[], %(workflow_ids)s::text[], %(tokens)s::bigint[])
       AS held (app, workflow, workflow_id, fencing_token)
 WHERE i.app = held.app AND i.workflow = held.workflow AND i.workflow_id = held.workflow_id
   AND i.fencing_token = held.fencing_token AND i.lease_owner IS NOT NULL AND i.lease_expires_at > clock_timestamp()
RETURNING i.app, i.workflow, i.workflow_id

-- lock_instance --
-- Lock one instance row for a fenced write; what it holds now, to say why the write was refused if it is.
SELECT fencing_token, lease_owner, state_version, first_token
  FROM keel_instances
 WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
   FOR UPDATE

-- commit_turn --
-- Fenced: new state and history, message done, next message queued, turn recorded, lease released; no row if stale.
WITH up AS (
    UPDATE keel_instances
       SET state = %(state)s, state_version = state_version + 1, state_written_at = clock_timestamp(),
           state_writer = %(worker)s, lease_owner = NULL, lease_expires_at = NULL,
           (next_visible_at, next_seq) = (
               SELECT visible_at, seq FROM keel_messages
                WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
                  AND status = 'pending' AND message_id <> %(message_id)s
                ORDER BY visible_at, seq
                LIMIT 1)
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
       AND fencing_token = %(fencing_token)s AND lease_owner IS NOT NULL AND lease_expires_at > clock_timestamp()
       AND state_version = %(version_read)s
    RETURNING state_version, state, state_written_at, state_writer
), kept AS (
    INSERT INTO keel_state_history (app, workflow, workflow_id, version, state, written_at, writer)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, state_version, state, state_written_at, state_writer FROM up
), trimmed AS (
    -- Every statement in a WITH sees the same snapshot, so this never sees (or deletes) the row inserted above.
    DELETE FROM keel_state_history AS h USING up
     WHERE h.app = %(app)s AND h.workflow = %(workflow)s AND h.workflow_id = %(workflow_id)s
       AND h.version <= up.state_version - %(history_limit)s
), done AS (
    UPDATE keel_messages AS m
       SET status = 'done', state_version = up.state_version, finished_at = up.state_written_at
      FROM up
     WHERE m.app = %(app)s AND m.message_id = %(message_id)s
), recorded AS (
    INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
                            version_written, started_at, duration_s, outcome)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, %(message_id)s, %(worker)s, %(attempt)s, %(fencing_token)s,
           %(version_read)s, up.state_version, %(started_at)s, %(duration_s)s, 'committed'
      FROM up
)
SELECT state_version FROM up

-- fail_turn --
-- Fenced: message failed with its error, instance paused on it, turn recorded, lease released; no row if stale.
WITH up AS (
    UPDATE keel_instances
       SET paused = true, lease_owner = NULL, lease_expires_at = NULL,
           (next_visible_at, next_seq) = (
               SELECT visible_at, seq FROM keel_messages WHERE app = %(app)s AND message_id = %(message_id)s)
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
       AND fencing_token = %(fencing_token)s AND lease_owner IS NOT NULL AND lease_expires_at > clock_timestamp()
    RETURNING state_version
), failed AS (
    UPDATE keel_messages AS m
       SET status = 'failed', error = %(error)s, finished_at = clock_timestamp()
      FROM up
     WHERE m.app = %(app)s AND m.message_id = %(message_id)s
), recorded AS (
    INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
                            version_written, started_at, duration_s, outcome, error)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, %(message_id)s, %(worker)s, %(attempt)s, %(fencing_token)s,
           %(version_read)s, NULL, %(started_at)s, %(duration_s)s, 'failed', %(error)s
      FROM up
)
SELECT state_version FROM up

-- release --
-- Clear the lease if it is still held under the given token; nothing otherwise (a retry's hold stays).
UPDATE keel_instances
   SET lease_owner = NULL, lease_expires_at = NULL
 WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
   AND fencing_token = %(fencing_token)s AND lease_owner IS NOT NULL

-- record_step --
-- Fenced: record a step's result for the message unless its name was recorded before; no row if stale.
WITH held AS (
    SELECT 1
      FROM keel_instances
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
       AND fencing_token = %(fencing_token)s AND lease_owner IS NOT NULL AND lease_expires_at > clock_timestamp()
), recorded AS (
    INSERT INTO keel_steps (app, message_id, name, result, worker, fencing_token, duration_s)
    SELECT %(app)s, %(message_id)s, %(name)s, %(result)s, %(worker)s, %(fencing_token)s, %(duration_s)s
      FROM held
    ON CONFLICT (app, message_id, name) DO NOTHING
)
SELECT 1 FROM held

-- retry_turn --
-- Fenced: turn recorded as a retry, lease released but the instance held until delay_s from now; no row if stale.
-- The message stays pending (and next on it, its visible_at and seq unchanged), its attempts as they are: the next
-- claim counts one more.
WITH up AS (
    UPDATE keel_instances
       SET lease_owner = NULL,
           lease_expires_at = clock_timestamp() + make_interval(secs => greatest(%(delay_s)s, 0))
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
       AND fencing_token = %(fencing_token)s AND lease_owner IS NOT NULL AND lease_expires_at > clock_timestamp()
    RETURNING state_version
), recorded AS (
    INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
                            version_written, started_at, duration_s, outcome, error)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, %(message_id)s, %(worker)s, %(attempt)s, %(fencing_token)s,
           %(version_read)s, NULL, %(started_at)s, %(duration_s)s, 'retry', %(error)s
      FROM up
)
SELECT state_version FROM up

-- dead_letters --
-- An app's failed messages, newest failure first (finished_at is when a failed message failed).
SELECT workflow, workflow_id, message_id, coalesce(error, ''), attempts, finished_at
  FROM keel_messages
 WHERE app = %(app)s AND status = 'failed'
 ORDER BY finished_at DESC, seq DESC
 LIMIT %(limit)s

-- resolve_dead_letter --
-- After lock_instance: retry (skip false) or skip the failed message pausing the instance, and un-pause it.
-- No row if the instance is not paused by a failed message. The sub-select runs on the statement's snapshot, where
-- the dead message is still failed: the next message is the first pending one by (visible_at, seq), the dead one
-- counted among them when it is retried (it keeps its place); with skip there may be none.
WITH dead AS (
    SELECT m.seq, m.message_id
      FROM keel_instances AS i JOIN keel_messages AS m ON m.seq = i.next_seq
     WHERE i.app = %(app)s AND i.workflow = %(workflow)s AND i.workflow_id = %(workflow_id)s
       AND i.paused AND m.status = 'failed'
), resolved AS (
    UPDATE keel_messages AS m
       SET status = CASE WHEN %(skip)s THEN 'skipped' ELSE 'pending' END,
           attempts = CASE WHEN %(skip)s THEN m.attempts ELSE 0 END,
           error = CASE WHEN %(skip)s THEN m.error END,
           finished_at = CASE WHEN %(skip)s THEN m.finished_at END
      FROM dead
     WHERE m.seq = dead.seq
), resumed AS (
    UPDATE keel_instances AS i
       SET paused = false,
           (next_visible_at, next_seq) = (
               SELECT m.visible_at, m.seq FROM keel_messages AS m
                WHERE m.app = %(app)s AND m.workflow = %(workflow)s AND m.workflow_id = %(workflow_id)s
                  AND (m.status = 'pending' OR (NOT %(skip)s AND m.seq = dead.seq))
                ORDER BY m.visible_at, m.seq
                LIMIT 1)
      FROM dead
     WHERE i.app = %(app)s AND i.workflow = %(workflow)s AND i.workflow_id = %(workflow_id)s
)
-- Delivered at commit: the instance may be claimable again, so idle workers should look.
SELECT message_id, pg_notify(%(channel)s, '') FROM dead

-- message --
-- A message's instance and status.
SELECT workflow, workflow_id, status, state_version, error
  FROM keel_messages
 WHERE app = %(app)s AND message_id = %(message_id)s

-- state --
-- An instance's committed state; no row before its first committed turn.
SELECT state_version, state, state_written_at, state_writer
  FROM keel_instances
 WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s AND state_version > 0

-- turns --
-- An instance's turn records, newest first.
SELECT message_id, worker, attempt, fencing_token, version_read, version_written, started_at, duration_s, outcome,
       error
  FROM keel_turns
 WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
 ORDER BY id DESC
 LIMIT %(limit)s

-- has_work --
-- Whether an app has a claimable instance: asked after each LISTEN, since sends before it notified nobody. Only
-- visible work counts: an instance whose next message is a timer not due yet is no work now.
SELECT EXISTS (
    SELECT 1
      FROM keel_instances
     WHERE app = %(app)s AND next_seq IS NOT NULL AND NOT paused
       AND next_visible_at <= (SELECT clock_timestamp())
       AND (lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp())
)

-- prune --
-- Delete up to limit finished messages (with their steps, by cascade) and up to limit turn records of an app, older
-- than the cut-offs; a message with an idempotency key only once it was sent before keys_before. Rows another
-- pruner has locked are skipped: it deletes them. How many of each went.
WITH doomed AS (
    SELECT message_id
      FROM keel_messages
     WHERE app = %(app)s AND status IN ('done', 'skipped') AND finished_at < %(finished_before)s
       AND (idempotency_key IS NULL OR sent_at < %(keys_before)s)
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), messages AS (
    DELETE FROM keel_messages AS m USING doomed
     WHERE m.app = %(app)s AND m.message_id = doomed.message_id
    RETURNING 1
), old_turns AS (
    SELECT id
      FROM keel_turns
     WHERE app = %(app)s AND started_at < %(finished_before)s
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), turns AS (
    DELETE FROM keel_turns AS t USING old_turns
     WHERE t.id = old_turns.id
    RETURNING 1
)
SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM turns)

-- delete_instance --
-- After lock_instance: delete the instance with its messages (and their steps, by cascade), state history and turn
-- records, and keep its last fencing token in a tombstone. The foreign keys are checked at the end of the
-- statement, once the children are gone.
WITH gone AS (
    DELETE FROM keel_instances
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
    RETURNING fencing_token
), messages AS (
    DELETE FROM keel_messages
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
), history AS (
    DELETE FROM keel_state_history
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
), turns AS (
    DELETE FROM keel_turns
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
), buried AS (
    INSERT INTO keel_instance_tombstones AS t (app, workflow, workflow_id, fencing_token)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, fencing_token FROM gone
    ON CONFLICT (app, workflow, workflow_id) DO UPDATE
       SET fencing_token = greatest(t.fencing_token, excluded.fencing_token), deleted_at = clock_timestamp()
)
SELECT count(*) FROM gone

-- listen --
-- Subscribe the listener connection to a channel; {channel} is filled in as a quoted identifier.
LISTEN {channel}

-- The statements of the PostgreSQL broker, loaded by keel.backends._sql; the tables are in schema.sql (runtime_v1 to
-- runtime_v6).
--
-- Writes that must see every message committed before them run in one transaction of two statements: the first
-- locks the instance rows, the second (a fresh snapshot under read committed, taken once the locks are held) reads
-- and writes. One statement alone would read the inbox through a snapshot older than the row it locked. Lease
-- times come from clock_timestamp(), the server's clock. Parameters use psycopg's %(name)s style. The statements
-- scripts.py prepares get their parameter types from the server's inference: a parameter whose use alone would be
-- inferred wrongly is cast (%(delay_s)s::float8, which next to the literal 0 would be taken for an integer).
--
-- A lease is live while its token is the instance's, lease_owner is set and lease_expires_at is in the future.
-- Commit, release and retry clear lease_owner; a retry leaves lease_expires_at set, to hold the instance back from
-- claims until then (claims look at lease_expires_at only).
--
-- An instance's next message (next_visible_at, next_seq) is its pending message with the smallest (visible_at, seq);
-- while a failed message pauses the instance, that failed message. Claims take instances whose next message is
-- visible (next_visible_at <= now), in (next_visible_at, next_seq) order.

-- lock_inboxes --
-- Create the instances that are new, of the kind given, and lock each one's row (the no-op update takes the lock), so
-- that one inbox's sends are serial; in the order given (the lock order, see transactions.py), each instance once.
INSERT INTO keel_instances AS i (app, workflow, workflow_id, kind)
SELECT given.app, given.workflow, given.workflow_id, given.kind
  FROM unnest(%(apps)s::text[], %(workflows)s::text[], %(workflow_ids)s::text[], %(kinds)s::text[]) WITH ORDINALITY
       AS given (app, workflow, workflow_id, kind, n)
 ORDER BY given.n
ON CONFLICT (app, workflow, workflow_id) DO UPDATE SET next_seq = i.next_seq

-- append --
-- Append a message visible delay_s from now (not if its id or idempotency key was used), queue it first if it becomes
-- visible before the instance's next message, and wake listeners; the id that stands for the message, and whether
-- it was not appended because its idempotency key holds a message with another payload (a conflict for send).
-- A tombstone here means lock_inbox has just created the instance again after delete_instance: it takes the
-- tombstone's fencing token over, so that no token of the deleted instance is handed out again.
WITH revived AS (
    DELETE FROM keel_instance_tombstones
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
    RETURNING fencing_token
), sent AS (
    INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, idempotency_key, sent_at, visible_at)
    SELECT %(app)s, %(message_id)s, %(workflow)s, %(workflow_id)s, %(payload)s, %(idempotency_key)s,
           clock.now, clock.now + make_interval(secs => greatest(%(delay_s)s::float8, 0))
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
-- Read only when nothing was appended, through the snapshot from before the insert: the message first sent under
-- the key, if there was one, and whether its payload is another.
SELECT coalesce(
           (SELECT message_id FROM sent),
           (SELECT message_id FROM keel_messages
             WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
               AND idempotency_key = %(idempotency_key)s),
           %(message_id)s),
       CASE WHEN EXISTS (SELECT FROM sent) THEN false
            ELSE EXISTS (SELECT FROM keel_messages
                          WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
                            AND idempotency_key = %(idempotency_key)s AND payload <> %(payload)s) END,
       -- Delivered at commit, naming the workflow (listeners wake only the workers that claim it); a repeated send
       -- wakes listeners for nothing, which is allowed. A timer wakes nobody: nothing is claimable because of it
       -- before it is due, and idle workers poll (has_work counts it once due).
       CASE WHEN %(delay_s)s::float8 <= 0 THEN pg_notify(%(channel)s, %(workflow)s) END

-- lock_ready --
-- Lock up to limit claimable instances, earliest visible next message first, skipping rows other claimers hold, and
-- keep their keys for lease, the transaction's next statement, in the transaction-local setting keel.claimed (a JSON
-- array): both statements go to the server together, one round trip per claim, whether it finds work or not.
-- Each asked workflow is one range of keel_instances_ready_by_workflow (so the ready instances of the others are never
-- stepped over), up to limit from each, merged; the server's now is read once (an InitPlan), so that each index scan
-- stops at it. Rows locked beyond the first limit are let go when the claim's transaction ends, a moment later.
SELECT set_config(
           'keel.claimed',
           coalesce(jsonb_agg(jsonb_build_object('workflow', workflow, 'workflow_id', workflow_id)), '[]')::text,
           true)
  FROM (SELECT ready.workflow, ready.workflow_id
          FROM unnest(%(workflows)s::text[]) AS asked (workflow)
               CROSS JOIN LATERAL (
                   SELECT workflow, workflow_id, next_visible_at, next_seq
                     FROM keel_instances
                    WHERE app = %(app)s AND workflow = asked.workflow
                      AND next_seq IS NOT NULL AND NOT paused
                      AND next_visible_at <= (SELECT clock_timestamp())
                      AND (lease_expires_at IS NULL OR lease_expires_at <= clock_timestamp())
                    ORDER BY next_visible_at, next_seq
                    LIMIT %(limit)s
                      FOR UPDATE SKIP LOCKED) AS ready
         ORDER BY ready.next_visible_at, ready.next_seq
         LIMIT %(limit)s) AS ready

-- lease --
-- After lock_ready, in a fresh snapshot taken with the rows locked: lease the instances it locked (keel.claimed) under
-- fresh fencing tokens, count an attempt of each one's next message, read its steps.
WITH picked AS MATERIALIZED (
    SELECT workflow, workflow_id
      FROM jsonb_to_recordset(current_setting('keel.claimed')::jsonb) AS picked (workflow text, workflow_id text)
), leased AS (
    UPDATE keel_instances AS i
       SET fencing_token = i.fencing_token + 1,
           lease_owner = %(worker)s,
           lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_s)s)
      FROM picked
     WHERE i.app = %(app)s AND i.workflow = picked.workflow AND i.workflow_id = picked.workflow_id
       -- The same keys again as arrays, which the primary key's index scan takes as its condition. The planner cannot
       -- know that picked holds at most limit rows (it guesses 100), so on the join alone it scanned every instance of
       -- the app (or of the workflow) to hash them, at every claim: the cost grew with the number of instances.
       AND i.workflow = ANY (ARRAY(SELECT workflow FROM picked))
       AND i.workflow_id = ANY (ARRAY(SELECT workflow_id FROM picked))
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
-- The rows are locked in the order given (the lock order, see transactions.py) before the update writes them.
WITH held AS MATERIALIZED (
    SELECT i.app, i.workflow, i.workflow_id
      FROM keel_instances AS i
           JOIN unnest(%(apps)s::text[], %(workflows)s::text[], %(workflow_ids)s::text[], %(tokens)s::bigint[])
                WITH ORDINALITY AS given (app, workflow, workflow_id, fencing_token, n)
           ON i.app = given.app AND i.workflow = given.workflow AND i.workflow_id = given.workflow_id
     WHERE i.fencing_token = given.fencing_token
     ORDER BY given.n
       FOR UPDATE OF i
)
-- The rows are held now: their tokens are still the ones checked above.
UPDATE keel_instances AS i
   SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_s)s)
  FROM held
 WHERE i.app = held.app AND i.workflow = held.workflow AND i.workflow_id = held.workflow_id
   AND i.lease_owner IS NOT NULL AND i.lease_expires_at > clock_timestamp()
RETURNING i.app, i.workflow, i.workflow_id

-- lock_instance --
-- Lock one instance row for a fenced write; what it holds now, to say why the write was refused if it is.
SELECT fencing_token, lease_owner, state_version, first_token
  FROM keel_instances
 WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
   FOR UPDATE

-- lock_instances --
-- Lock the instance rows of several fenced writes that share a transaction (group commit), in the order given (the
-- lock order, see transactions.py); what each holds now, to say why a write was refused if it is.
SELECT i.app, i.workflow, i.workflow_id, i.fencing_token, i.lease_owner, i.state_version, i.first_token
  FROM keel_instances AS i
       JOIN unnest(%(apps)s::text[], %(workflows)s::text[], %(workflow_ids)s::text[])
            WITH ORDINALITY AS given (app, workflow, workflow_id, n)
       ON i.app = given.app AND i.workflow = given.workflow AND i.workflow_id = given.workflow_id
 ORDER BY given.n
   FOR UPDATE OF i

-- commit_turn --
-- Fenced: new state and history, message done, next message queued, turn recorded, lease released; no row if stale.
-- A NULL state is a handler delivery's acknowledgement: no state and no history are written, the message and the
-- turn record get the state version the claim read.
WITH new AS (
    SELECT %(state)s::text AS state, clock_timestamp() AS now
), up AS (
    UPDATE keel_instances AS i
       SET state = coalesce(new.state, i.state),
           state_version = i.state_version + CASE WHEN new.state IS NULL THEN 0 ELSE 1 END,
           state_written_at = CASE WHEN new.state IS NULL THEN i.state_written_at ELSE new.now END,
           state_writer = CASE WHEN new.state IS NULL THEN i.state_writer ELSE %(worker)s END,
           lease_owner = NULL, lease_expires_at = NULL,
           (next_visible_at, next_seq) = (
               SELECT visible_at, seq FROM keel_messages
                WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
                  AND status = 'pending' AND message_id <> %(message_id)s
                ORDER BY visible_at, seq
                LIMIT 1)
      FROM new
     WHERE i.app = %(app)s AND i.workflow = %(workflow)s AND i.workflow_id = %(workflow_id)s
       AND i.fencing_token = %(fencing_token)s AND i.lease_owner IS NOT NULL
       AND i.lease_expires_at > clock_timestamp() AND i.state_version = %(version_read)s
    RETURNING i.state_version, i.state, i.state_written_at, i.state_writer, new.state IS NOT NULL AS written, new.now
), kept AS (
    INSERT INTO keel_state_history (app, workflow, workflow_id, version, state, written_at, writer)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, state_version, state, state_written_at, state_writer
      FROM up
     WHERE written
), trimmed AS (
    -- Every statement in a WITH sees the same snapshot, so this never sees (or deletes) the row inserted above.
    DELETE FROM keel_state_history AS h USING up
     WHERE h.app = %(app)s AND h.workflow = %(workflow)s AND h.workflow_id = %(workflow_id)s
       AND up.written AND h.version <= up.state_version - %(history_limit)s
), done AS (
    -- RETURNING shows the row as updated: if a client marked it waited meanwhile, this waited for that mark.
    UPDATE keel_messages AS m
       SET status = 'done', state_version = up.state_version, finished_at = up.now
      FROM up
     WHERE m.app = %(app)s AND m.message_id = %(message_id)s
    RETURNING m.waited
), recorded AS (
    INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
                            version_written, started_at, duration_s, outcome)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, %(message_id)s, %(worker)s, %(attempt)s, %(fencing_token)s,
           %(version_read)s, up.state_version, %(started_at)s, %(duration_s)s, %(outcome)s
      FROM up
)
-- Delivered at commit, to the clients waiting for this message's end (see runtime_v6 for why only to them).
SELECT state_version, (SELECT pg_notify(%(end_channel)s, %(message_id)s) FROM done WHERE done.waited) FROM up

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
    RETURNING m.waited
), recorded AS (
    INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
                            version_written, started_at, duration_s, outcome, error)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, %(message_id)s, %(worker)s, %(attempt)s, %(fencing_token)s,
           %(version_read)s, NULL, %(started_at)s, %(duration_s)s, %(outcome)s, %(error)s
      FROM up
)
-- Delivered at commit, to the clients waiting for this message's end, as commit_turn's.
SELECT state_version, (SELECT pg_notify(%(end_channel)s, %(message_id)s) FROM failed WHERE failed.waited) FROM up

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
           lease_expires_at = clock_timestamp() + make_interval(secs => greatest(%(delay_s)s::float8, 0))
     WHERE app = %(app)s AND workflow = %(workflow)s AND workflow_id = %(workflow_id)s
       AND fencing_token = %(fencing_token)s AND lease_owner IS NOT NULL AND lease_expires_at > clock_timestamp()
    RETURNING state_version
), recorded AS (
    INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
                            version_written, started_at, duration_s, outcome, error)
    SELECT %(app)s, %(workflow)s, %(workflow_id)s, %(message_id)s, %(worker)s, %(attempt)s, %(fencing_token)s,
           %(version_read)s, NULL, %(started_at)s, %(duration_s)s, %(outcome)s, %(error)s
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
    RETURNING m.message_id, m.waited
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
-- Delivered at commit: the instance may be claimable again, so idle workers should look; a skipped message has ended,
-- so the clients waiting for it should look too.
SELECT message_id, pg_notify(%(channel)s, %(workflow)s),
       (SELECT pg_notify(%(end_channel)s, resolved.message_id) FROM resolved WHERE %(skip)s AND resolved.waited)
  FROM dead

-- mark_waited --
-- Mark a message as waited for, so that the write that ends it notifies; its instance and status as message reads them.
-- An end in progress holds the row: this waits for it to commit, then returns the row as that commit left it. Whatever
-- commits after this has the mark. (A dead tuple per wait; the mark is never cleared: an ended message never ends
-- again, and a dead letter retried and waited for anew is marked already.)
UPDATE keel_messages
   SET waited = true
 WHERE app = %(app)s AND message_id = %(message_id)s
RETURNING workflow, workflow_id, status, state_version, error

-- async_commit --
-- Commit the transaction without waiting for its WAL to reach the disk: for mark_waited, whose mark a crash may lose
-- at no cost (the waiters' LISTEN connection breaks with the server, and every waiter marks and reads again).
SET LOCAL synchronous_commit TO off

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
-- Delete up to limit finished messages (with their steps, by cascade), up to limit turn records and up to limit events
-- of an app, older than the cut-offs; a message or an event with an idempotency key only once it was sent (published)
-- before keys_before. A handler delivery's instance (its row's kind is delivery_kind) goes whole with its
-- last message, without a tombstone: its id is an event id, never used again. Rows another pruner has locked are
-- skipped: it deletes them. How many messages, turn records and events went.
WITH doomed AS (
    SELECT message_id, workflow, workflow_id
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
), delivered AS (
    -- Every statement in a WITH sees the same snapshot: the messages deleted above are still there to look at.
    SELECT DISTINCT d.workflow, d.workflow_id
      FROM doomed AS d JOIN keel_instances AS i
           ON i.app = %(app)s AND i.workflow = d.workflow AND i.workflow_id = d.workflow_id
     WHERE i.kind = %(delivery_kind)s
       AND NOT EXISTS (
           SELECT FROM keel_messages AS m
            WHERE m.app = %(app)s AND m.workflow = d.workflow AND m.workflow_id = d.workflow_id
              AND m.message_id NOT IN (SELECT message_id FROM doomed))
), delivery_instances AS (
    -- The foreign keys are checked at the end of the statement, once the children are gone too. An instance whose
    -- inbox a send has just filled again (it waited for the row lock, then changed next_seq) stays.
    DELETE FROM keel_instances AS i USING delivered
     WHERE i.app = %(app)s AND i.workflow = delivered.workflow AND i.workflow_id = delivered.workflow_id
       AND i.next_seq IS NULL
), delivery_history AS (
    DELETE FROM keel_state_history AS h USING delivered
     WHERE h.app = %(app)s AND h.workflow = delivered.workflow AND h.workflow_id = delivered.workflow_id
), delivery_turns AS (
    DELETE FROM keel_turns AS t USING delivered
     WHERE t.app = %(app)s AND t.workflow = delivered.workflow AND t.workflow_id = delivered.workflow_id
       AND t.id NOT IN (SELECT id FROM old_turns)
), old_events AS (
    SELECT event_id
      FROM keel_events
     WHERE app = %(app)s AND published_at < %(finished_before)s
       AND (idempotency_key IS NULL OR published_at < %(keys_before)s)
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), events AS (
    DELETE FROM keel_events AS e USING old_events
     WHERE e.app = %(app)s AND e.event_id = old_events.event_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM turns), (SELECT count(*) FROM events)

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

-- log_events --
-- Append events (a JSON array of objects, one per event) to their apps' logs in the order given, except those whose
-- id, or idempotency key, the log holds already (or an event before them in the array has); the app and id of each
-- one appended. A concurrent append of the same id or key makes this one wait for its transaction to end.
INSERT INTO keel_events (app, event_id, type, payload, handlers, source_app, source_workflow, source_workflow_id,
                         source_message_id, idempotency_key, published_at)
SELECT e.app, e.event_id, e.type, e.payload, e.handlers, e.source_app, e.source_workflow, e.source_workflow_id,
       e.source_message_id, e.idempotency_key, clock_timestamp()
  FROM ROWS FROM (
           jsonb_to_recordset(%(events)s::jsonb)
           AS (app text, event_id text, type text, payload text, handlers jsonb, source_app text, source_workflow text,
               source_workflow_id text, source_message_id text, idempotency_key text)
       ) WITH ORDINALITY AS e (app, event_id, type, payload, handlers, source_app, source_workflow, source_workflow_id,
                               source_message_id, idempotency_key, n)
 ORDER BY e.n
ON CONFLICT DO NOTHING
RETURNING app, event_id

-- logged_event --
-- The event that stands for one whose append did nothing: itself if its id is in the log, else the one holding its
-- idempotency key, with its type and payload (which a publish under the key must repeat); no row if neither is there
-- (any more).
SELECT event_id, type, payload
  FROM keel_events
 WHERE app = %(app)s AND (event_id = %(event_id)s OR idempotency_key = %(idempotency_key)s)
 ORDER BY event_id = %(event_id)s DESC
 LIMIT 1

-- events --
-- An app's last events, newest first.
SELECT seq, event_id, type, payload, handlers, source_app, source_workflow, source_workflow_id, source_message_id,
       idempotency_key, published_at
  FROM keel_events
 WHERE app = %(app)s
 ORDER BY seq DESC
 LIMIT %(limit)s

-- begin --
-- Open the transaction of one write (the pool's connections are in autocommit mode).
BEGIN

-- commit --
-- Commit the transaction of one write.
COMMIT

-- listen --
-- Subscribe the listener connection to a channel; {channel} is filled in as a quoted identifier.
LISTEN {channel}

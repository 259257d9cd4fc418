-- The statements of the PostgreSQL store, loaded by keel.backends._sql.
--
-- Connections are in autocommit mode: each statement is its own transaction, so every write below is
-- atomic on its own and takes one round trip. Parameters use psycopg's %(name)s style.

-- lock_schema --
-- Serialise migrations across processes until the migration transaction ends (the key is "keel" in ASCII).
SELECT pg_advisory_xact_lock(1801807212)

-- schema_version --
-- The schema version a component has reached; no row before its first migration.
SELECT version FROM keel_schema WHERE component = %(component)s

-- record_schema_version --
-- Record the schema version a component has reached.
INSERT INTO keel_schema (component, version) VALUES (%(component)s, %(version)s)
ON CONFLICT (component) DO UPDATE SET version = excluded.version, migrated_at = clock_timestamp()

-- get --
-- The live version of a key: no row when it was never written or is a tombstone.
SELECT version, value, written_at, writer
  FROM keel_kv
 WHERE key = %(key)s AND value IS NOT NULL

-- current --
-- The current row of a key, tombstone included: the whole history when no past versions are kept.
SELECT version, value, written_at, writer
  FROM keel_kv
 WHERE key = %(key)s

-- create --
-- Create a key at version 1, or revive its tombstone at the next version, with history; no row if it is live.
WITH up AS (
    INSERT INTO keel_kv AS kv (key, version, value, written_at, writer)
    VALUES (%(key)s, 1, %(value)s, clock_timestamp(), %(writer)s)
    ON CONFLICT (key) DO UPDATE
       SET version = kv.version + 1, value = excluded.value, written_at = excluded.written_at,
           writer = excluded.writer
     WHERE kv.value IS NULL
    RETURNING key, version, value, written_at, writer
), ins AS (
    INSERT INTO keel_kv_history (key, version, value, written_at, writer)
    SELECT key, version, value, written_at, writer FROM up WHERE %(history_limit)s > 0
), trimmed AS (
    -- Every statement in a WITH sees the same snapshot, so this never sees (or deletes) the row inserted above.
    DELETE FROM keel_kv_history AS h USING up
     WHERE h.key = up.key AND h.version <= up.version - %(history_limit)s
)
SELECT version, value, written_at, writer FROM up

-- swap --
-- Move a live key from the expected version to the next (NULL value: delete), with history; no row if stale.
WITH up AS (
    UPDATE keel_kv
       SET version = version + 1, value = %(value)s, written_at = clock_timestamp(), writer = %(writer)s
     WHERE key = %(key)s AND version = %(expected)s AND value IS NOT NULL
    RETURNING key, version, value, written_at, writer
), ins AS (
    INSERT INTO keel_kv_history (key, version, value, written_at, writer)
    SELECT key, version, value, written_at, writer FROM up WHERE %(history_limit)s > 0
), trimmed AS (
    -- Every statement in a WITH sees the same snapshot, so this never sees (or deletes) the row inserted above.
    DELETE FROM keel_kv_history AS h USING up
     WHERE h.key = up.key AND h.version <= up.version - %(history_limit)s
)
SELECT version, value, written_at, writer FROM up

-- history --
-- The kept versions of a key, newest first, tombstones included.
SELECT version, value, written_at, writer
  FROM keel_kv_history
 WHERE key = %(key)s
 ORDER BY version DESC
 LIMIT %(limit)s

-- current_schema --
-- The schema the search_path resolves to, where the tables are: it namespaces the broker's NOTIFY channels.
SELECT current_schema()

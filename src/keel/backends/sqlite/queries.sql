-- schema_version --
-- The schema version recorded for a component, if any.
SELECT version FROM keel_schema WHERE component = :component

-- record_schema_version --
-- Record that a component's schema is at a version.
INSERT INTO keel_schema (component, version) VALUES (:component, :version)
ON CONFLICT (component) DO UPDATE SET version = excluded.version

-- get_current --
-- The current row of a key, tombstone or not.
SELECT version, value, written_at, writer FROM keel_kv WHERE key = :key

-- create --
-- Create a key that does not exist, or revive a tombstone from its version + 1.
INSERT INTO keel_kv (key, version, value, written_at, writer)
VALUES (:key, 1, :value, :written_at, :writer)
ON CONFLICT (key) DO UPDATE
    SET version = keel_kv.version + 1, value = excluded.value,
        written_at = excluded.written_at, writer = excluded.writer
    WHERE keel_kv.value IS NULL
RETURNING version

-- swap --
-- Compare-and-swap a live key at an expected version; :value NULL writes a tombstone (a delete).
UPDATE keel_kv
SET version = version + 1, value = :value, written_at = :written_at, writer = :writer
WHERE key = :key AND version = :expected AND value IS NOT NULL
RETURNING version

-- append_history --
-- Keep a written version in the key's history.
INSERT INTO keel_kv_history (key, version, value, written_at, writer)
VALUES (:key, :version, :value, :written_at, :writer)

-- trim_history --
-- Drop the versions of a key that fall outside the history limit.
DELETE FROM keel_kv_history WHERE key = :key AND version <= :oldest_dropped

-- history --
-- Kept versions of a key, newest first.
SELECT version, value, written_at, writer FROM keel_kv_history
WHERE key = :key ORDER BY version DESC LIMIT :limit

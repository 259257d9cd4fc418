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

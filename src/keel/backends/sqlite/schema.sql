-- keel's SQLite schema, version 1. Applied once per file under BEGIN IMMEDIATE, recorded in keel_schema.

CREATE TABLE IF NOT EXISTS keel_schema (
    component TEXT PRIMARY KEY,
    version   INTEGER NOT NULL
);

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

"""The SQLite engine's store: versioned keys with compare-and-swap, in the file its connection opened.

Each write is one function run inside one ``BEGIN IMMEDIATE`` transaction on the connection's thread
(``SqliteDatabase.write``): the current value, its history entry and the trimming of old history change together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keel.backends._sql import load_queries
from keel.backends.base import StoredRecord, StoreOptions
from keel.backends.sqlite.rows import stored_record
from keel.errors import StaleWriteError

if TYPE_CHECKING:
    import sqlite3

    from keel.backends.sqlite.connection import Database

#: The store's statements, by name (``queries.sql``).
QUERIES = load_queries(__package__ or "keel.backends.sqlite", "queries.sql")


class SqliteStore:
    """A versioned store in one SQLite file, shared by every process on the machine that opens it."""

    def __init__(self, database: Database, options: StoreOptions) -> None:
        self.url = database.url
        self.database = database
        self._history_limit = options.history_limit

    async def get(self, key: str, /) -> StoredRecord | None:
        """Return the current version of ``key``, or None."""
        row = await self.database.run(lambda conn: conn.execute(QUERIES["get_current"], {"key": key}).fetchone())
        if row is None or row[1] is None:
            return None
        return stored_record(key, row)

    async def put(self, key: str, value_json: str, /, *, expected_version: int | None, writer: str) -> StoredRecord:
        """Compare-and-swap ``key`` to ``value_json``."""
        return await self.database.write(lambda conn: self._write(conn, key, value_json, expected_version, writer))

    async def delete(self, key: str, /, *, expected_version: int, writer: str) -> StoredRecord:
        """Delete ``key`` at ``expected_version``, leaving a tombstone."""
        return await self.database.write(lambda conn: self._write(conn, key, None, expected_version, writer))

    async def history(self, key: str, /, *, limit: int) -> list[StoredRecord]:
        """Return kept versions of ``key``, newest first."""
        params: dict[str, Any] = {"key": key, "limit": limit}
        query = QUERIES["get_current" if self._history_limit == 0 else "history"]
        rows = await self.database.run(lambda conn: conn.execute(query, params).fetchall())
        return [stored_record(key, row) for row in rows]

    async def aclose(self) -> None:
        """Close the connection and its thread."""
        await self.database.aclose()

    def _write(
        self, conn: sqlite3.Connection, key: str, value: str | None, expected: int | None, writer: str
    ) -> StoredRecord:
        """One write, inside the caller's BEGIN IMMEDIATE transaction; raising rolls it back."""
        written_at = datetime.now(UTC)
        params: dict[str, Any] = {
            "key": key,
            "value": value,
            "expected": expected,
            "written_at": written_at.isoformat(),
            "writer": writer,
        }
        row = conn.execute(QUERIES["create" if expected is None else "swap"], params).fetchone()
        if row is None:
            row = conn.execute(QUERIES["get_current"], {"key": key}).fetchone()
            live = stored_record(key, row) if row is not None and row[1] is not None else None
            raise StaleWriteError(key, expected, live.version if live else None, current=live)
        version = int(row[0])
        if self._history_limit > 0:
            conn.execute(QUERIES["append_history"], {**params, "version": version})
            if version > self._history_limit:
                conn.execute(QUERIES["trim_history"], {"key": key, "oldest_dropped": version - self._history_limit})
        return StoredRecord(key, version, value, written_at, writer)

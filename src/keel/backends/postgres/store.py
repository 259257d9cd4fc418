"""The PostgreSQL engine's store: versioned keys with compare-and-swap, over the engine's pool (``connection.py``).

Each operation is one statement, hence one round trip; a lost compare-and-swap takes one more, to read the version it
ran into. Each write is ONE statement (``create`` and ``swap`` in ``queries.sql``): its CTEs change the current row
in ``keel_kv``, append that version to ``keel_kv_history`` and trim history beyond ``history_limit``, so the three
happen together or not at all. Row locks make concurrent writers to one key take turns, and the loser's ``WHERE
version = expected`` is re-checked against the winner's row, so exactly one of them succeeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keel.backends.postgres.connection import fetch_one
from keel.backends.postgres.migrate import QUERIES
from keel.backends.postgres.rows import stored_record
from keel.errors import StaleWriteError

if TYPE_CHECKING:
    from keel.backends.base import StoredRecord, StoreOptions
    from keel.backends.postgres.connection import PostgresConnection

#: How often a write whose stale read shows the version it expected is tried again (the key changed in between).
_WRITE_ATTEMPTS = 3


class PostgresStore:
    """A versioned store in PostgreSQL tables, shared by every process that opens the same database and schema."""

    def __init__(self, connection: PostgresConnection, options: StoreOptions) -> None:
        self.url = connection.url
        self.connection = connection
        self._options = options

    async def aclose(self) -> None:
        """Close the pool's connections. Safe to call twice."""
        await self.connection.aclose()

    async def get(self, key: str, /) -> StoredRecord | None:
        """Return the current version of ``key``, or None."""
        async with self.connection.connection() as conn:
            row = await fetch_one(conn, QUERIES["get"], {"key": key})
        return None if row is None else stored_record(key, row)

    async def put(self, key: str, value_json: str, /, *, expected_version: int | None, writer: str) -> StoredRecord:
        """Compare-and-swap ``key`` to ``value_json`` in one statement."""
        return await self._write(key, value_json, expected_version=expected_version, writer=writer)

    async def delete(self, key: str, /, *, expected_version: int, writer: str) -> StoredRecord:
        """Delete ``key`` at ``expected_version``, leaving a tombstone."""
        return await self._write(key, None, expected_version=expected_version, writer=writer)

    async def history(self, key: str, /, *, limit: int) -> list[StoredRecord]:
        """Return kept versions of ``key``, newest first."""
        kept = self._options.history_limit
        params: dict[str, Any]
        if kept == 0:
            query, params = QUERIES["current"], {"key": key}
        else:
            query, params = QUERIES["history"], {"key": key, "limit": min(limit, kept)}
        async with self.connection.connection() as conn:
            cursor = await conn.execute(query, params)
            rows = await cursor.fetchall()
        return [stored_record(key, row) for row in rows]

    async def _write(
        self, key: str, value_json: str | None, *, expected_version: int | None, writer: str
    ) -> StoredRecord:
        query = QUERIES["create"] if expected_version is None else QUERIES["swap"]
        params = {
            "key": key,
            "value": value_json,
            "expected": expected_version,
            "writer": writer,
            "history_limit": self._options.history_limit,
        }
        live: StoredRecord | None = None
        for _ in range(_WRITE_ATTEMPTS):
            async with self.connection.connection() as conn:
                row = await fetch_one(conn, query, params)
                if row is not None:
                    return stored_record(key, row)
                # A fresh statement, hence a fresh snapshot: the version that beat us, not the one we started from.
                found = await fetch_one(conn, QUERIES["get"], {"key": key})
            live = None if found is None else stored_record(key, found)
            actual = None if live is None else live.version
            if actual != expected_version:
                raise StaleWriteError(key, expected_version, actual, current=live)
            # A create lost to a live key that was deleted before the second statement: it may succeed now.
        raise StaleWriteError(key, expected_version, None if live is None else live.version, current=live)

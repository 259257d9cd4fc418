"""The SQLite engine's entry point and store: ``sqlite:///path.db``.

``open_engine`` opens the store alone; ``open_backend`` the store and the broker (``broker.py``) over one
connection (``backend.py``).

URL options (query string): ``synchronous`` (OFF, NORMAL, FULL, EXTRA; default FULL: every commit is on
disk before it returns) and ``busy_timeout_s`` (default 30: how long a writer waits for another process).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keel.backends._url import query_options
from keel.backends.base import StoredRecord, StoreOptions
from keel.backends.sqlite.database import (
    DEFAULT_BUSY_TIMEOUT_S,
    QUERIES,
    SqliteDatabase,
    parse_synchronous,
)
from keel.backends.sqlite.location import database_path, refuse_network_filesystem
from keel.errors import ConfigurationError, StaleWriteError

if TYPE_CHECKING:
    import sqlite3

    from keel.backends.sqlite.backend import SqliteBackend
    from keel.backends.sqlite.database import Database

logger = logging.getLogger(__name__)

_KNOWN_OPTIONS = frozenset({"synchronous", "busy_timeout_s"})


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
        return _record(key, row)

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
        return [_record(key, row) for row in rows]

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
            live = _record(key, row) if row is not None and row[1] is not None else None
            raise StaleWriteError(key, expected, live.version if live else None, current=live)
        version = int(row[0])
        if self._history_limit > 0:
            conn.execute(QUERIES["append_history"], {**params, "version": version})
            if version > self._history_limit:
                conn.execute(QUERIES["trim_history"], {"key": key, "oldest_dropped": version - self._history_limit})
        return StoredRecord(key, version, value, written_at, writer)


def _record(key: str, row: tuple[Any, ...]) -> StoredRecord:
    return StoredRecord(key, int(row[0]), row[1], datetime.fromisoformat(row[2]), row[3])


async def open_engine(url: str, options: StoreOptions) -> SqliteStore:
    """Open (creating if needed) the SQLite database that ``url`` names.

    Raises:
        ConfigurationError: A bad path or option.
        UnsafeLocationError: The file is on a network filesystem.
        BackendUnavailable: The file cannot be opened.
    """
    return SqliteStore(await open_database(url), options)


async def open_backend(url: str, options: StoreOptions) -> SqliteBackend:
    """Open (creating if needed) the SQLite database that ``url`` names, store and broker.

    Raises:
        ConfigurationError: A bad path or option.
        UnsafeLocationError: The file is on a network filesystem.
        BackendUnavailable: The file cannot be opened.
    """
    # Imported here: backend.py builds on this module, and a store alone never needs the broker.
    from keel.backends.sqlite.backend import SqliteBackend

    return SqliteBackend(await open_database(url), options)


async def open_database(url: str) -> SqliteDatabase:
    """Check ``url``, then open its file with the schema brought up to date.

    Raises:
        ConfigurationError: A bad path or option.
        UnsafeLocationError: The file is on a network filesystem.
        BackendUnavailable: The file cannot be opened.
    """
    query = query_options(url)
    unknown = sorted(set(query) - _KNOWN_OPTIONS)
    if unknown:
        raise ConfigurationError(f"unknown SQLite URL option(s) {unknown}; known: {sorted(_KNOWN_OPTIONS)}")
    synchronous = parse_synchronous(query.get("synchronous", "FULL"))
    busy_timeout_s = _positive_float(query.get("busy_timeout_s"), DEFAULT_BUSY_TIMEOUT_S, "busy_timeout_s")
    path = database_path(url)
    refuse_network_filesystem(path)
    database = SqliteDatabase(path, f"sqlite:///{path}", synchronous=synchronous, busy_timeout_s=busy_timeout_s)
    await database.open()
    return database


def _positive_float(raw: str | None, default: float, name: str) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigurationError(f"{name}={raw!r} must be a positive number of seconds")
    return value

"""One SQLite connection on a thread of its own, shared by the store and the broker of a process.

Why a thread: sqlite3 blocks, and the event loop must never block. Why one function per call: a write
transaction is opened, run and committed inside a single function on that thread, so nothing is ever
awaited while the file's write lock is held; a paused or busy event loop cannot stall other processes.
Writers take the lock up front (``BEGIN IMMEDIATE``) so that two of them never deadlock upgrading a read
lock, and a generous busy timeout rides out contention between processes rather than failing fast.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import warnings
from typing import TYPE_CHECKING, TypeVar

from keel.backends._sql import load_queries
from keel.backends.sqlite.thread import BlockingThread
from keel.errors import BackendUnavailable, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The statements of the store and the schema bookkeeping, by name (``queries.sql``).
QUERIES = load_queries(__package__ or "keel.backends.sqlite", "queries.sql")

#: The schema steps (``schema.sql``); ``bootstrap`` runs every time, the rest once each, in this order.
_SCHEMA = load_queries(__package__ or "keel.backends.sqlite", "schema.sql")
MIGRATIONS = (_SCHEMA["store_v1"], _SCHEMA["runtime_v2"], _SCHEMA["runtime_v3"], _SCHEMA["runtime_v4"])

#: The schema version this code writes and reads, recorded in ``keel_schema`` under ``SCHEMA_COMPONENT``.
SCHEMA_VERSION = len(MIGRATIONS)
SCHEMA_COMPONENT = "store"

#: How long a writer waits for another process's write lock before giving up, by default.
DEFAULT_BUSY_TIMEOUT_S = 30.0

#: Accepted values of the ``synchronous`` URL option; FULL makes every commit durable across power loss.
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


class SqliteDatabase:
    """A connection to one database file, driven from a dedicated thread."""

    def __init__(self, path: Path, url: str, *, synchronous: str, busy_timeout_s: float) -> None:
        self.path = path
        self.url = url
        self._synchronous = synchronous
        self._busy_timeout_s = busy_timeout_s
        self._thread = BlockingThread(f"keel-sqlite:{path.name}")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def open(self) -> None:
        """Connect, set the pragmas and create or migrate the schema."""
        try:
            await self._thread.call(self._connect)
        except BaseException:
            self._closed = True
            self._thread.stop()
            raise

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the database thread and return its result.

        Raises:
            BackendUnavailable: The file cannot be opened or read, or stayed locked past the busy timeout.
        """
        if self._closed:
            raise BackendUnavailable(self.url, "the store is closed")
        return await self._thread.call(lambda: self._call(fn))

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in one ``BEGIN IMMEDIATE`` transaction: committed if it returns, else rolled back."""
        return await self.run(lambda conn: _in_transaction(conn, fn))

    async def aclose(self) -> None:
        """Close the connection and stop the thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._thread.call(self._disconnect)
        self._thread.stop()

    def __del__(self) -> None:
        if not self._closed and self._conn is not None:
            warnings.warn(f"keel SQLite store {self.path} was not closed", ResourceWarning, stacklevel=1)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise BackendUnavailable(self.url, "the connection is not open")
        try:
            return fn(self._conn)
        except sqlite3.OperationalError as exc:
            raise BackendUnavailable(self.url, str(exc), hint=_hint(exc)) from exc
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.IntegrityError):
                raise
            raise BackendUnavailable(self.url, str(exc), hint="is the file a keel SQLite database?") from exc

    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise BackendUnavailable(self.url, str(exc), hint=_hint(exc)) from exc
        self._conn = conn
        try:
            self._configure(conn)
            _migrate(conn)
        except sqlite3.Error as exc:
            self._disconnect()
            raise BackendUnavailable(self.url, str(exc), hint=_hint(exc)) from exc
        except BaseException:
            self._disconnect()
            raise

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        mode = self._switch_to_wal(conn)
        if mode != "wal":
            raise BackendUnavailable(self.url, f"could not switch the database to WAL mode (it stays {mode})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """Set WAL mode, waiting out other openers of a new file.

        Switching needs an exclusive lock, and SQLite answers "database is locked" at once, without calling the
        busy handler, when another connection is mid-transaction on a file not yet in WAL mode (to avoid a
        deadlock): so retry here, within the busy timeout.
        """
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode == "wal":
                return mode
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the file to ``SCHEMA_VERSION`` in one transaction; the write lock serialises racing processes."""
    _in_transaction(conn, _apply_migrations)


def _apply_migrations(conn: sqlite3.Connection) -> None:
    _execute_script(conn, _SCHEMA["bootstrap"])
    found = conn.execute(QUERIES["schema_version"], {"component": SCHEMA_COMPONENT}).fetchone()
    reached = 0 if found is None else int(found[0])
    if reached > SCHEMA_VERSION:
        raise ConfigurationError(
            f"this SQLite database has keel schema version {reached}, newer than this keel "
            f"understands ({SCHEMA_VERSION}); upgrade keel-runtime"
        )
    if reached == SCHEMA_VERSION:
        return
    for step in MIGRATIONS[reached:]:
        _execute_script(conn, step)
    conn.execute(QUERIES["record_schema_version"], {"component": SCHEMA_COMPONENT, "version": SCHEMA_VERSION})
    logger.info("SQLite database migrated from schema version %d to %d", reached, SCHEMA_VERSION)


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it would commit the open transaction first, and the migration must be all or nothing.
    for statement in _statements(script):
        conn.execute(statement)


def _statements(script: str) -> list[str]:
    """Split a section on ';', keeping a trigger's ``BEGIN ... END`` body (which has ';' inside) in one piece."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    statements, pending = [], ""
    for piece in "\n".join(lines).split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip().removesuffix(";").strip())
            pending = ""
    if pending.strip(" \n;"):
        statements.append(pending.strip().removesuffix(";").strip())
    return [s for s in statements if s]


def _hint(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "another process held the write lock past the busy timeout; raise busy_timeout_s= in the URL"
    if "unable to open" in text or "readonly" in text or "read-only" in text:
        return "check that the folder exists and this user may write the file and its -wal and -shm files"
    if "disk" in text and "full" in text:
        return "the disk is full"
    return "check the file and its folder"


def parse_synchronous(value: str) -> str:
    """Return a valid ``PRAGMA synchronous`` level from a URL option.

    Raises:
        ConfigurationError: The level is not one SQLite knows.
    """
    level = value.upper()
    if level not in SYNCHRONOUS_LEVELS:
        raise ConfigurationError(f"synchronous={value!r} is not one of {', '.join(SYNCHRONOUS_LEVELS)}")
    return level

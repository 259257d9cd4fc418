"""The SQLite engine's connection: one connection on a thread of its own, shared by the store and the broker.

It opens the file its URL names, and is the one place where sqlite3's errors become ``BackendUnavailable`` (the file
cannot be opened, read or written) or ``BackendOverloaded`` (another process held the write lock past the busy
timeout: load, not an outage). Calls of this process wait their turn on the thread, first come first served and
without a bound: no call of this process ever fails for waiting behind the others.

URL options (query string): ``synchronous`` (OFF, NORMAL, FULL, EXTRA; default FULL: every commit is on
disk before it returns) and ``busy_timeout_s`` (default 30: how long a writer waits for another process).

Why a thread: sqlite3 blocks, and the event loop must never block. Why one function per call: a write
transaction is opened, run and committed inside a single function on that thread, so nothing is ever
awaited while the file's write lock is held; a paused or busy event loop cannot stall other processes.
Writers take the lock up front (``BEGIN IMMEDIATE``) so that two of them never deadlock upgrading a read
lock, and a generous busy timeout rides out contention between processes rather than failing fast. Keel
processes take turns at a lock file first (``writelock``: they sleep in the kernel and are woken by the
release); a process that does not (an older keel, the ``sqlite3`` shell) is waited for here, in pauses of at
most a millisecond (``_BusyWait``), not by SQLite's busy handler, whose pauses grow to 100 ms. Both waits
together last the busy timeout at most. Writes of this process waiting at the same time share one transaction
(``writes``: group commit).
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from keel.backends._url import query_options
from keel.backends.sqlite.location import database_path, lock_path, refuse_network_filesystem
from keel.backends.sqlite.migrate import migrate
from keel.backends.sqlite.thread import BlockingThread
from keel.backends.sqlite.writelock import WriteLock
from keel.backends.sqlite.writes import MAX_GROUP, GroupFailure, PendingWrite, Refused, answer, commit_group
from keel.errors import BackendOverloaded, BackendUnavailable, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

logger = logging.getLogger(__name__)

T = TypeVar("T")

_KNOWN_OPTIONS = frozenset({"synchronous", "busy_timeout_s"})

#: How long a writer waits for another process's write lock before giving up, by default.
DEFAULT_BUSY_TIMEOUT_S = 30.0

#: The first and the longest pause between tries of a call that found the file locked by another process (see
#: ``_BusyWait``): pauses double from the first, the longest bounds how late a waiting writer notices the lock free.
BUSY_FIRST_PAUSE_S = 0.0001
BUSY_MAX_PAUSE_S = 0.001

#: Accepted values of the ``synchronous`` URL option; FULL makes every commit durable across power loss.
SYNCHRONOUS_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


class Database(Protocol):
    """What the store and the broker need of their connection: a ``SqliteDatabase``, or a handle sharing one."""

    #: The file (for ``memory://``, a name standing for the in-memory database: it keys wake-ups, nothing is written).
    path: Path
    #: The URL it was opened with: safe to log and to put in errors.
    url: str

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the database thread (see ``SqliteDatabase.run``)."""
        ...

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        after_commit: Callable[[T], object] | None = None,
        read_first: Callable[[sqlite3.Connection], T | None] | None = None,
    ) -> T:
        """Run ``fn(connection)`` in a write transaction (see ``SqliteDatabase.write``)."""
        ...

    async def aclose(self) -> None:
        """Release the connection. Safe to call twice."""
        ...


class SqliteDatabase:
    """A connection to one database file (or one in-memory database), driven from a dedicated thread.

    With ``in_memory`` the database lives in this connection alone (``:memory:``): no file, no WAL, no sync; ``path``
    only names it. It is what ``memory://`` runs on, shared by handles (``keel.backends.sqlite.memory``).
    """

    def __init__(
        self, path: Path, url: str, *, synchronous: str, busy_timeout_s: float, in_memory: bool = False
    ) -> None:
        self.path = path
        self.url = url
        self.in_memory = in_memory
        self._synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._thread = BlockingThread(f"keel-sqlite:{path.name}")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        #: Writes waiting for the thread: appended by ``write`` on the event loop, taken by ``_flush`` on the thread;
        #: ``_flushing`` is True while a flush is queued or running (it takes what is appended meanwhile).
        self._writes: collections.deque[PendingWrite[Any]] = collections.deque()
        self._writes_lock = threading.Lock()
        self._flushing = False
        #: Taken around each write transaction, so that keel processes on the file wait for each other in the kernel.
        self._write_lock = None if in_memory else WriteLock(lock_path(path))

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

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        after_commit: Callable[[T], object] | None = None,
        read_first: Callable[[sqlite3.Connection], T | None] | None = None,
    ) -> T:
        """Run ``fn(connection)`` in a ``BEGIN IMMEDIATE`` transaction: committed if it returns, else rolled back.

        The transaction may hold other writes of this process waiting at the same time (``writes``, group commit);
        this one is answered after the commit, and rolled back alone (to its savepoint) if it raises.

        Args:
            fn: The write; run again from the start if the transaction must be (it was rolled back first).
            after_commit: Run with the result on the database thread once the commit released the write lock; never
                after a rollback. Must not raise.
            read_first: Run first, outside any transaction; if it returns something other than None, that is the
                result, and ``fn`` never runs (so no write lock is taken).

        Raises:
            BackendUnavailable: The file cannot be written, or stayed locked past the busy timeout.
        """
        if self._closed:
            raise BackendUnavailable(self.url, "the store is closed")
        pending = PendingWrite(fn, after_commit, read_first)
        with self._writes_lock:
            self._writes.append(pending)
            start, self._flushing = not self._flushing, True
        if start:
            self._thread.post(self._flush)
        return await pending.future

    async def aclose(self) -> None:
        """Close the connection and stop the thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._thread.call(self._disconnect)
        self._thread.stop()

    def park(self) -> None:
        """Stop the thread after the calls already submitted, keeping the connection (and its data) for ``unpark``."""
        self._thread.stop()

    def unpark(self) -> None:
        """Start a thread again for a parked connection; nothing to do for one that is running."""
        if not self._thread.alive:
            self._thread = BlockingThread(f"keel-sqlite:{self.path.name}")

    def __del__(self) -> None:
        # An in-memory database lives as long as the process by design (until forget_memory): no leak to report.
        if not self._closed and self._conn is not None and not self.in_memory:
            warnings.warn(f"keel SQLite store {self.path} was not closed", ResourceWarning, stacklevel=1)

    def _call(self, fn: Callable[[sqlite3.Connection], T], *, busy_timeout_s: float | None = None) -> T:
        """Run ``fn``, trying it again after a short pause while another process holds the lock it needs.

        Trying again is safe: ``fn`` is a read, or a write transaction that rolled back (``commit_group``). Such
        waits last ``busy_timeout_s`` at most (the URL's by default).
        """
        if self._conn is None:
            raise BackendUnavailable(self.url, "the connection is not open")
        busy = _BusyWait(self.busy_timeout_s if busy_timeout_s is None else busy_timeout_s)
        while True:
            try:
                return fn(self._conn)
            except sqlite3.DatabaseError as exc:
                if _is_busy(exc) and busy.pause():
                    continue
                error = self._translate(exc)
                if error is exc:
                    raise
                raise error from exc

    def _translate(self, exc: Exception) -> Exception:
        """The error a caller sees for ``exc``: SQLite's errors as keel's, but a broken constraint."""
        if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
            error: Exception = self._overloaded()
        elif isinstance(exc, sqlite3.OperationalError):
            error = BackendUnavailable(self.url, str(exc), hint=_hint(exc))
        elif isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
            error = BackendUnavailable(self.url, str(exc), hint="is the file a keel SQLite database?")
        else:
            return exc
        error.__cause__ = exc  # as "raise error from exc" would
        return error

    def _overloaded(self) -> BackendOverloaded:
        """The file answers, but another process held its write lock for the whole busy timeout."""
        return BackendOverloaded(
            self.url,
            waited_s=self.busy_timeout_s,
            queued=1 + len(self._writes),
            connections=1,
            hint=(
                "another process held the database's write lock all that time; raise busy_timeout_s= in the URL, "
                "or run fewer processes writing to the file"
            ),
        )

    def _flush(self) -> None:
        """On the thread: run the writes waiting now (up to ``MAX_GROUP``) in one transaction, and answer them.

        Writes still waiting after that go in another flush, queued behind the calls submitted meanwhile (reads wait
        for one group at a time, not for every write that keeps coming).
        """
        with self._writes_lock:
            # Closed: every write waiting fails now, in this flush (no other may run after the thread's end).
            limit = MAX_GROUP if self._conn is not None else len(self._writes)
            taken = [self._writes.popleft() for _ in range(min(len(self._writes), limit))]
        try:
            self._write_group(taken)
        finally:
            answer(taken)
            with self._writes_lock:
                again = self._flushing = bool(self._writes)
            if again:
                self._thread.post(self._flush)

    def _write_group(self, taken: list[PendingWrite[Any]]) -> None:
        writing = [pending for pending in taken if not self._answered_by_reading(pending)]
        while writing:
            try:
                outcome = self._commit(writing)
            except Exception as exc:  # noqa: BLE001 - handed to every write of the group
                for pending in writing:
                    pending.fail(exc)
                return
            if isinstance(outcome, GroupFailure):
                writing.pop(outcome.index).fail(self._translate(outcome.error))
                continue
            for pending, result in zip(writing, outcome, strict=True):
                if isinstance(result, Refused):
                    pending.fail(self._translate(result.error))
                else:
                    pending.succeed(result)
            for pending, result in zip(writing, outcome, strict=True):
                if pending.after_commit is not None and not isinstance(result, Refused):
                    _after_commit(pending.after_commit, result)
            return

    def _commit(self, writing: list[PendingWrite[Any]]) -> list[Any] | GroupFailure:
        """Run ``commit_group`` holding the keel processes' write lock (``writelock``), all within the busy timeout."""
        if self._write_lock is None:
            return self._call(lambda conn: commit_group(conn, writing))
        started = time.monotonic()
        if not self._write_lock.acquire(self.busy_timeout_s):
            # What SQLite's lock would have given after the same wait: callers see one error for both.
            raise self._translate(sqlite3.OperationalError("database is locked"))
        try:
            left_s = max(0.0, self.busy_timeout_s - (time.monotonic() - started))
            return self._call(lambda conn: commit_group(conn, writing), busy_timeout_s=left_s)
        finally:
            self._write_lock.release()  # before the callers hear of it: the next writer need not wait for them

    def _answered_by_reading(self, pending: PendingWrite[Any]) -> bool:
        if pending.read_first is None:
            return False
        try:
            found = self._call(pending.read_first)
        except Exception as exc:  # noqa: BLE001 - handed to the write's caller
            pending.fail(exc)
            return True
        if found is None:
            return False
        pending.succeed(found)
        return True

    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(
                ":memory:" if self.in_memory else self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise BackendUnavailable(self.url, str(exc), hint=_hint(exc)) from exc
        self._conn = conn
        try:
            self._configure(conn)
            migrate(conn)
            # From now on _call waits for locks itself, in shorter steps than SQLite's busy handler (_BusyWait).
            conn.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error as exc:
            self._disconnect()
            if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                raise self._overloaded() from exc
            raise BackendUnavailable(self.url, str(exc), hint=_hint(exc)) from exc
        except BaseException:
            self._disconnect()
            raise

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if self.in_memory:
            return  # one connection, no file: no other process to share a journal with, nothing to sync
        mode = self._switch_to_wal(conn)
        if mode != "wal":
            raise BackendUnavailable(self.url, f"could not switch the database to WAL mode (it stays {mode})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        """Set WAL mode, waiting out other openers of a new file.

        Switching needs an exclusive lock, and SQLite answers "database is locked" at once, without calling the
        busy handler, when another connection is mid-transaction on a file not yet in WAL mode (to avoid a
        deadlock): so retry here, within the busy timeout.
        """
        deadline = time.monotonic() + self.busy_timeout_s
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
        if self._write_lock is not None:
            self._write_lock.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _after_commit(callback: Callable[[T], object], result: T) -> None:
    try:
        callback(result)
    except Exception:  # the write is committed: its caller gets its result whatever happens here
        logger.exception("a callback after a committed SQLite write failed")


class _BusyWait:
    """Pauses between tries of a call that found the file locked: short ones, never past the busy timeout.

    Short, doubling from ``BUSY_FIRST_PAUSE_S`` up to ``BUSY_MAX_PAUSE_S``, so that a writer that comes second gets in
    soon after the lock comes free.

    Why not SQLite's own busy handler: it sleeps 1, 2, 5, 10, 15, 20, 25, 25, ... ms between tries, while a keel
    transaction holds the lock well under a millisecond; with three processes writing, a writer that loses a few
    races in a row sleeps tens of milliseconds on a lock that was free most of that time.
    """

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._deadline: float | None = None
        self._pause_s = BUSY_FIRST_PAUSE_S

    def pause(self) -> bool:
        """Sleep before the next try and return True, or return False if the busy timeout has passed."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._timeout_s
        if now >= self._deadline:
            return False
        time.sleep(min(self._pause_s, self._deadline - now))
        self._pause_s = min(self._pause_s * 2, BUSY_MAX_PAUSE_S)
        return True


def _is_busy(exc: sqlite3.DatabaseError) -> bool:
    """True if the statement found the file locked by another connection (SQLITE_BUSY or one of its variants)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "database is locked" in str(exc)
    return bool(code & 0xFF == sqlite3.SQLITE_BUSY)


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

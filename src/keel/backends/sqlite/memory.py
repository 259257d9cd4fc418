"""``memory://`` and ``memory://NAME``: the SQLite engine on an in-memory database, for single-process tests.

Not an engine of its own: the store and the broker are the SQLite engine's, the schema and every statement the same
as the embedded default's, so ``memory://`` cannot drift from ``sqlite:///`` (it passes the same conformance suite
because it runs the same code). What differs is only where the pages live: in one ``:memory:`` connection instead of
a WAL file, with nothing synced to disk.

Every store, backend and client opened on one URL in one process shares that connection (and its thread), so a
test's client and an in-process worker see the same data. Like a file, the data outlives the handles: a backend
closed and opened again finds what it wrote, until ``forget(url)`` (what ``keel.testing`` and the test fixtures call)
or the end of the process. While no handle is open the connection's thread is stopped, so an idle in-memory database
costs its pages and nothing else. Another process sees nothing of it, which is why ``keel worker`` and every other
command that exits refuse ``memory://``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from keel.backends.sqlite.backend import SqliteBackend
from keel.backends.sqlite.database import DEFAULT_BUSY_TIMEOUT_S, SqliteDatabase
from keel.backends.sqlite.store import SqliteStore
from keel.errors import BackendUnavailable, ConfigurationError

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable

    from keel.backends.base import StoreOptions

T = TypeVar("T")


class _Shared:
    """One in-memory database and the number of handles open on it."""

    def __init__(self, database: SqliteDatabase) -> None:
        self.database = database
        self.handles = 0


#: The in-memory databases of this process, by name; an entry goes with ``forget``.
_DATABASES: dict[str, _Shared] = {}


class MemoryHandle:
    """One user's hold on a shared in-memory database: the ``Database`` the SQLite store and broker run on.

    Closing it (twice is safe) parks the database's thread once no other handle is open; a closed handle refuses
    calls, as a closed file database does.
    """

    def __init__(self, shared: _Shared) -> None:
        self._shared: _Shared | None = shared
        self.path = shared.database.path
        self.url = shared.database.url
        shared.handles += 1

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the shared database's thread."""
        return await self._database().run(fn)

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        after_commit: Callable[[T], object] | None = None,
        read_first: Callable[[sqlite3.Connection], T | None] | None = None,
    ) -> T:
        """Run ``fn(connection)`` in a write transaction of the shared database (group-committed with its peers)."""
        return await self._database().write(fn, after_commit=after_commit, read_first=read_first)

    async def aclose(self) -> None:
        """Give the handle back; the last one parks the database's thread (the data stays)."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        shared.handles -= 1
        if shared.handles == 0:
            shared.database.park()

    def _database(self) -> SqliteDatabase:
        if self._shared is None:
            raise BackendUnavailable(self.url, "the store is closed")
        return self._shared.database


def memory_name(url: str) -> str:
    """The database name a ``memory://NAME`` URL gives (empty for plain ``memory://``).

    Raises:
        ConfigurationError: The URL carries a query string (``memory://`` takes no options).
    """
    rest = url.split("://", 1)[1]
    if "?" in rest:
        raise ConfigurationError(f"{url!r}: memory:// takes no options (its name is everything after memory://)")
    return rest.strip("/")


async def open_handle(url: str) -> MemoryHandle:
    """Open a handle on the in-memory database ``url`` names, creating it (with the schema) on first use.

    Raises:
        ConfigurationError: A bad URL.
    """
    name = memory_name(url)
    shared = _DATABASES.get(name)
    if shared is None:
        # A path no file has: it names the database in thread names and keys its wake-ups; nothing is written there.
        path = Path("/") / f"keel-memory-{os.getpid()}" / (name or "default")
        database = SqliteDatabase(
            path, f"memory://{name}", synchronous="OFF", busy_timeout_s=DEFAULT_BUSY_TIMEOUT_S, in_memory=True
        )
        shared = _DATABASES[name] = _Shared(database)
        # Registered before the schema is made: an opener arriving meanwhile queues behind it on the same thread.
        try:
            await database.open()
        except BaseException:
            _DATABASES.pop(name, None)
            raise
    else:
        shared.database.unpark()
    return MemoryHandle(shared)


async def forget(url: str) -> None:
    """Drop the in-memory database ``url`` names, data and all; handles still open on it fail from now on.

    Raises:
        ConfigurationError: A bad URL.
    """
    shared = _DATABASES.pop(memory_name(url), None)
    if shared is not None:
        shared.database.unpark()  # closing runs on the connection's thread
        await shared.database.aclose()


async def open_engine(url: str, options: StoreOptions) -> SqliteStore:
    """Open the store of the in-memory database ``url`` names.

    Raises:
        ConfigurationError: A bad URL.
    """
    return SqliteStore(await open_handle(url), options)


async def open_backend(url: str, options: StoreOptions) -> SqliteBackend:
    """Open the store and broker of the in-memory database ``url`` names.

    Raises:
        ConfigurationError: A bad URL.
    """
    return SqliteBackend(await open_handle(url), options)

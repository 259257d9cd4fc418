"""The SQLite engine's entry points: ``sqlite:///path.db``, the store alone or the whole backend.

``open_backend`` composes the store (``store.py``) and the broker (``broker.py``) over one connection
(``connection.py``, which also documents the URL's options).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel.backends.composed import ComposedBackend
from keel.backends.sqlite.broker import SqliteBroker
from keel.backends.sqlite.connection import open_database
from keel.backends.sqlite.store import SqliteStore

if TYPE_CHECKING:
    from keel.backends.base import StoreOptions
    from keel.backends.sqlite.connection import Database


class SqliteBackend(ComposedBackend[SqliteStore, SqliteBroker]):
    """What ``open_backend("sqlite:///...")`` returns: the store and the broker of one file, on one connection.

    ``aclose`` closes the shared connection and its thread; it is safe to call twice, and after ``store.aclose()``.
    """

    @property
    def database(self) -> Database:
        """The connection the store and the broker share."""
        return self.broker.database


def compose(database: Database, options: StoreOptions) -> SqliteBackend:
    """The store and the broker over ``database``, as one backend."""
    return SqliteBackend(SqliteStore(database, options), SqliteBroker(database))


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
    return compose(await open_database(url), options)

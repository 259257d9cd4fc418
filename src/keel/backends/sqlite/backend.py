"""The SQLite backend: the store and the broker of one file, sharing one connection and its thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel.backends.sqlite.broker import SqliteBroker
from keel.backends.sqlite.store import SqliteStore

if TYPE_CHECKING:
    from keel.backends.base import StoreEngine, StoreOptions
    from keel.backends.sqlite.database import Database


class SqliteBackend(SqliteBroker):
    """What ``open_backend("sqlite:///...")`` returns: the broker, with the store of the same file as ``.store``.

    ``aclose`` (the broker's) closes the shared connection and its thread; it is safe to call twice, and after
    ``store.aclose()``.
    """

    def __init__(self, database: Database, options: StoreOptions) -> None:
        super().__init__(database)
        self.url = database.url
        # Typed as the protocol says: Backend.store is a mutable attribute, so its type must match exactly.
        self.store: StoreEngine = SqliteStore(database, options)

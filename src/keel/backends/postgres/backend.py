"""The PostgreSQL engine's entry points: the store alone, or the store and the broker composed over one pool.

``open_backend`` opens the connection (``connection.py``: the URL, the pool, the error boundary, the migration) and
composes the store (``store.py``) and the broker (``broker.py``, with its LISTEN/NOTIFY wake transport ``wake.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel.backends.composed import ComposedBackend
from keel.backends.postgres.broker import PostgresBroker
from keel.backends.postgres.connection import PostgresConnection, PostgresSettings
from keel.backends.postgres.store import PostgresStore

if TYPE_CHECKING:
    from keel.backends.base import StoreOptions


class PostgresBackend(ComposedBackend[PostgresStore, PostgresBroker]):
    """The store and broker of one PostgreSQL schema, sharing one pool; plus one LISTEN connection, opened lazily."""


async def _opened(url: str) -> PostgresConnection:
    connection = PostgresConnection(PostgresSettings.from_url(url))
    try:
        await connection.open()
    except BaseException:
        await connection.aclose()
        raise
    return connection


async def open_engine(url: str, options: StoreOptions) -> PostgresStore:
    """Open the PostgreSQL store that ``url`` names, creating its tables if needed.

    Raises:
        ConfigurationError: The URL or a keel parameter in it is unusable, or the tables cannot be created.
        BackendUnavailable: The server cannot be reached.
    """
    return PostgresStore(await _opened(url), options)


async def open_backend(url: str, options: StoreOptions) -> PostgresBackend:
    """Open the PostgreSQL backend that ``url`` names, creating or upgrading its tables if needed.

    Raises:
        ConfigurationError: The URL or a keel parameter in it is unusable, or the tables cannot be created.
        BackendUnavailable: The server cannot be reached.
    """
    connection = await _opened(url)
    try:
        schema = await connection.current_schema()
    except BaseException:
        await connection.aclose()
        raise
    return PostgresBackend(PostgresStore(connection, options), PostgresBroker(connection, schema))

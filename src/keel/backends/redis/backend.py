"""The Redis engine's entry points: the store alone, or the store and the broker composed over one connection.

``open_backend`` opens the connection (``connection.py``: the URL, the client, the checks at connect, the error
boundary) and composes the store (``store.py``) and the broker (``broker.py``), whose waits block on a pool of
their own (``wake.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel.backends.composed import ComposedBackend
from keel.backends.redis.broker import RedisBroker
from keel.backends.redis.connection import SOCKET_TIMEOUT_S, make_client, masked_url, open_connection
from keel.backends.redis.keys import split_prefix
from keel.backends.redis.store import RedisStore
from keel.backends.redis.wake import WAIT_BLOCK_S, WAIT_CONNECTIONS

if TYPE_CHECKING:
    from keel.backends.base import StoreOptions


class RedisBackend(ComposedBackend[RedisStore, RedisBroker]):
    """The store and the broker of one Redis server, DB and prefix, on one connection pool (plus one for waits).

    Open it with ``open_backend``, which connects, checks the schema and loads every script.
    """


async def open_engine(url: str, options: StoreOptions) -> RedisStore:
    """Connect to the Redis server that ``url`` names (see ``connection.py`` for the URL).

    Returns:
        The open store.

    Raises:
        ConfigurationError: The URL or prefix cannot be used, or the data was written by a newer keel.
        BackendUnavailable: The server cannot be reached.
    """
    store = RedisStore(await open_connection(url), options)
    try:
        await store.load_script()
    except BaseException:
        await store.aclose()
        raise
    return store


async def open_backend(url: str, options: StoreOptions) -> RedisBackend:
    """Connect to the Redis server that ``url`` names, store and broker.

    Returns:
        The open backend.

    Raises:
        ConfigurationError: The URL or prefix cannot be used, or the data was written by a newer keel.
        BackendUnavailable: The server cannot be reached.
    """
    store = await open_engine(url, options)
    try:
        _, redis_url = split_prefix(url)
        # The socket timeout outlasts the longest block, so that a wait's silence is not taken for a dead server.
        waiting = make_client(
            redis_url,
            masked_url(url),
            socket_timeout_s=WAIT_BLOCK_S + SOCKET_TIMEOUT_S,
            max_connections=WAIT_CONNECTIONS,
        )
    except BaseException:
        await store.aclose()
        raise
    backend = RedisBackend(store, RedisBroker(store.connection, waiting))
    try:
        await backend.broker.load_scripts()
    except BaseException:
        await backend.aclose()
        raise
    return backend

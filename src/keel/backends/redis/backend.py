"""The Redis backend: the store and the broker on one connection pool, plus a pool for blocking waits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel.backends.redis.broker import RedisBroker
from keel.backends.redis.keys import split_prefix
from keel.backends.redis.store import SOCKET_TIMEOUT_S, _client, _masked, open_engine
from keel.backends.redis.wake import WAIT_BLOCK_S, WAIT_CONNECTIONS, WakeStreams
from keel.backends.wake import WakeGate

if TYPE_CHECKING:
    from keel.backends.base import StoreEngine, StoreOptions
    from keel.backends.redis.store import RedisStore


class RedisBackend(RedisBroker):
    """The store (``.store``) and the broker of one Redis server, DB and prefix.

    Open it with ``open_backend``, which connects, checks the schema and loads every script.
    """

    def __init__(self, store: RedisStore, waker: WakeStreams, gate: WakeGate) -> None:
        super().__init__(store._client, store._keys, store._unavailable_on_error, waker, gate)
        #: The URL the backend was opened with, password masked.
        self.url = store.url
        #: The versioned store, on the same connection pool as the broker.
        self.store: StoreEngine = store

    async def aclose(self) -> None:
        """Close both connection pools. Safe to call twice."""
        self._gate.close()
        await self._waker.aclose()
        await self.store.aclose()


async def open_redis_backend(url: str, options: StoreOptions) -> RedisBackend:
    """Connect to the Redis server that ``url`` names, store and broker (see ``open_engine`` for the URL).

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
        waiting = _client(
            redis_url, _masked(url), socket_timeout_s=WAIT_BLOCK_S + SOCKET_TIMEOUT_S, max_connections=WAIT_CONNECTIONS
        )
    except BaseException:
        await store.aclose()
        raise
    gate = WakeGate(store.url)
    waker = WakeStreams(waiting, store._keys, store._unavailable_on_error, gate)
    backend = RedisBackend(store, waker, gate)
    try:
        await backend.load_scripts()
    except BaseException:
        await backend.aclose()
        raise
    return backend

"""The Redis wake transport: every send appends to its app's wake stream, and a pump per app ``XREAD BLOCK``s on it.

The waiters and the wake rule are the backend's ``keel.backends.wake.WakeGate``; the pump tells it of each new
entry (``wake``), or of the error that stopped it (``fail_all``), and runs while waits for its app are parked.

A resolved dead letter appends too; the end of a retry's hold, or a timer (a delayed message) coming due,
appends nothing: a waiter sees it at its next claim, one idle poll later at most.

A stream, unlike pub/sub, remembers: a waiter reads from the last entry id it knows, so a send made while
it was busy, or disconnected, wakes it the moment it waits again. The id the pump first starts from is the one
the process's first claim on the app read, atomically with that claim (``claim.lua``); so a send after that
claim, even one made just before the first wait, is not missed. Later it goes on from the newest entry it read.

Blocking reads hold their connection for the whole block, so they use a pool of their own: a worker waiting
never takes a connection from the calls that claim and commit, and one pump per app serves every wait of the
backend. Each ``XREAD`` blocks at most ``WAIT_BLOCK_S`` (less if the URL's ``socket_timeout`` is short), under a
socket timeout longer than that, and the pump reads block after block while waits are parked: a server that dies
is noticed within one block.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from keel.errors import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractAsyncContextManager

    from redis.asyncio import Redis

    from keel.backends.redis.keys import RedisKeys
    from keel.backends.wake import WakeGate

#: The longest single blocking read, in seconds.
WAIT_BLOCK_S = 10.0

#: Connections of the waiting pool: how many waits of one backend may block at the same time.
WAIT_CONNECTIONS = 16

#: Entries one read returns at most; only the newest matters, a small stream keeps ~100.
_READ_COUNT = 1000


class WakeStreams:
    """Blocking reads of the apps' wake streams, on a dedicated client, remembering the last entry seen."""

    def __init__(
        self,
        client: Redis,
        keys: RedisKeys,
        boundary: Callable[[str], AbstractAsyncContextManager[None]],
        gate: WakeGate,
    ) -> None:
        self._client = client
        self._keys = keys
        self._boundary = boundary
        self._gate = gate
        self._seen: dict[str, str] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._block_s = block_seconds(client.connection_pool.connection_kwargs.get("socket_timeout"))

    def note_claimed(self, app: str, last_id: str) -> None:
        """Remember the wake stream's last id a claim read, if no read of ``app``'s stream has started from one yet."""
        self._seen.setdefault(app, last_id)

    def watch(self, app: str) -> None:
        """Hear of ``app``'s new entries: start its pump unless it runs (it stops once no wait is parked)."""
        pump = self._pumps.get(app)
        if pump is None or pump.done():
            self._pumps[app] = asyncio.create_task(self._pump(app), name=f"keel-redis-wake:{app}")

    async def aclose(self) -> None:
        """Stop the pumps and close the waiting pool."""
        for pump in self._pumps.values():
            pump.cancel()
        await asyncio.gather(*self._pumps.values(), return_exceptions=True)
        await self._client.aclose()

    async def _pump(self, app: str) -> None:
        stream = self._keys.wake(app)
        try:
            async with self._boundary("wait"):
                after = self._seen.get(app) or await self._last_id(app, stream)
                while self._gate.waiting(app):
                    block_ms = max(1, round(self._block_s * 1000))
                    reply: Any = await self._client.xread({stream: after}, count=_READ_COUNT, block=block_ms)
                    if reply:
                        # RESP2, decoded: [[stream, [(entry_id, fields), ...]]], oldest entry first.
                        after = str(reply[0][1][-1][0])
                        self._advance(app, after)
                        self._gate.wake(app)
        except BackendUnavailable as exc:
            self._gate.fail_all(exc)

    async def _last_id(self, app: str, stream: str) -> str:
        # No claim came first: wait for what is sent from now on.
        newest = await self._client.xrevrange(stream, count=1)
        last = str(newest[0][0]) if newest else "0-0"
        return self._seen.setdefault(app, last)

    def _advance(self, app: str, entry_id: str) -> None:
        # Concurrent waits may finish out of order: keep the newest id.
        known = self._seen.get(app)
        if known is None or _id_key(entry_id) > _id_key(known):
            self._seen[app] = entry_id


def block_seconds(socket_timeout_s: float | None) -> float:
    """The longest block that still ends before the socket timeout fires."""
    if socket_timeout_s is None:
        return WAIT_BLOCK_S
    return min(WAIT_BLOCK_S, max(socket_timeout_s - 1.0, socket_timeout_s / 2))


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)

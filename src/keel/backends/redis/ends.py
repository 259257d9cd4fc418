"""The Redis transport of message ends: one pub/sub connection per backend, telling its ``EndWaiters`` what it hears.

The commit, dead letter or skip that ends a message PUBLISHes its id on the app's channel ``keel:ended:{APP}``
from its own script (``announce_end`` in ``runtime_lib.lua``), so the announcement is part of the write. A client
waiting for ends (``wait_for_end``) subscribes to the channels of the apps it waits for, all on one connection of
the backend's waiting pool (never the main one), read by one pump task while waits are parked.

Pub/sub forgets what it published while a subscriber was away, so what keeps a wake-up from being lost is the rule
of ``EndWaiters``: every SUBSCRIBE that takes effect (the first, or the one after a reconnect) makes every wait of
that app read its status again, and an end committed before it is found by that read. A stream would remember, but
would cost every commit a write to the append-only file, for what the re-read gives at no cost to commits.

The pump SUBSCRIBEs and reads in slices of ``SUBSCRIBE_POLL_S`` (one coroutine owns the connection: redis-py's
pub/sub object is not meant to be written while another task reads it). When the connection fails, the pump drops
it, has every wait read again (each fails there if the server is gone) and, while waits remain, connects again
after ``RECONNECT_PAUSE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from keel.backends.tasks import cancel_and_wait

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

    from keel.backends.ends import EndWaiters
    from keel.backends.redis.keys import RedisKeys

logger = logging.getLogger(__name__)

#: How long a new wait may wait before the pump SUBSCRIBEs to its app's channel; also the pump's read slice.
SUBSCRIBE_POLL_S = 0.1

#: How long the pump pauses after its connection failed, before it connects again.
RECONNECT_PAUSE_S = 0.5


class EndSubscriber:
    """One pub/sub connection shared by every wait for ends of one backend."""

    def __init__(self, client: Redis, keys: RedisKeys, ends: EndWaiters) -> None:
        self._client = client
        self._keys = keys
        self._ends = ends
        self._channels: dict[str, str] = {}  # channel -> app, of every app whose ends were waited for
        self._subscribed: set[str] = set()  # channels subscribed to on the current connection
        self._pubsub: PubSub | None = None
        self._pump: asyncio.Task[None] | None = None
        self._closed = False

    def watch(self, app: str) -> None:
        """Hear of the ends of ``app``'s messages from now on, starting the pump if it is not running."""
        if self._closed:
            return
        self._channels.setdefault(self._keys.ended(app), app)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="keel-redis-ends")

    async def aclose(self) -> None:
        """Stop the pump and close its connection. Safe to call twice."""
        self._closed = True
        await cancel_and_wait(self._pump)
        await self._disconnect()

    async def _run(self) -> None:
        """Subscribe and read while waits are parked or the connection is up; reconnect after a failure."""
        while not self._closed and (self._ends.apps() or self._subscribed):
            try:
                await self._serve_slice()
            except (RedisError, OSError) as exc:
                logger.info("the pub/sub connection of %s was lost: every wait reads again: %s", self._ends.url, exc)
                await self._disconnect()
                self._ends.recheck()
                await asyncio.sleep(RECONNECT_PAUSE_S)

    async def _serve_slice(self) -> None:
        """Subscribe to the channels new waits need, then read for one slice (or sleep it, subscribed to nothing)."""
        waited = self._ends.apps()
        new = [channel for channel, app in self._channels.items() if app in waited and channel not in self._subscribed]
        if new:
            if self._pubsub is None:
                self._pubsub = self._client.pubsub()
            await self._pubsub.subscribe(*new)
            self._subscribed.update(new)
        if self._pubsub is None:
            await asyncio.sleep(SUBSCRIBE_POLL_S)
            return
        message = await self._pubsub.get_message(timeout=SUBSCRIBE_POLL_S)
        while message is not None:
            self._heard(message)
            message = await self._pubsub.get_message(timeout=0)

    def _heard(self, message: dict[str, object]) -> None:
        app = self._channels.get(str(message.get("channel")))
        if app is None:
            return
        if message.get("type") == "subscribe":
            self._ends.recheck(app)  # ends published before this took effect reached no one here
        elif message.get("type") == "message":
            self._ends.heard(app, str(message.get("data")))

    async def _disconnect(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._subscribed.clear()
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

"""Slots for a fixed number of connections, taken first come first served: a fair queue in front of a pool.

Why an engine needs it: redis-py's ``BlockingConnectionPool`` is not first come first served. A waiter woken for a
returned connection must take the pool's lock again, and goes back to the end of the line if a newer call took the
connection first; a call that loops (a send, then a wait polling the message's status) returns its connection and
takes it straight back, so under a steady stream of such calls some waiters lose every time and give up after the
pool's timeout while the server sits idle. Here a returned slot is handed straight to the oldest waiter: no one
overtakes, so a wait is bounded by the work queued before it, never by luck.

A call that holds a slot uses at most one connection at a time, so with as many slots as connections the pool
under it never has to make anyone wait.
"""

from __future__ import annotations

import asyncio
import collections
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class SlotTimeout(Exception):
    """Raised by ``FairSlots.slot`` when no slot came free within the bound: how long, behind how many.

    Internal: the engine turns it into ``BackendOverloaded`` or ``BackendUnavailable``.
    """

    def __init__(self, waited_s: float, queued: int, size: int) -> None:
        self.waited_s = waited_s
        self.queued = queued
        self.size = size
        super().__init__(f"no slot within {waited_s:g} s: {queued} calls queued for {size} slots")


class FairSlots:
    """At most ``size`` calls hold a slot at once; the others wait in arrival order, each ``timeout_s`` at most."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._free = size
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        """How many calls are waiting for a slot now."""
        return sum(1 for waiter in self._waiting if not waiter.done())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the body of the ``async with``.

        Raises:
            SlotTimeout: Every slot stayed taken for ``timeout_s``; the call was never let through.
        """
        await self._take()
        try:
            yield
        finally:
            self._give_back()

    async def _take(self) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting.append(waiter)
        # A timer rather than a cancellation: a slot handed over just as the bound passes is then either taken or
        # timed out, never lost between the two.
        timer = loop.call_later(self.timeout_s, self._expire, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back()  # handed a slot, then cancelled before using it: pass it on
            raise
        finally:
            timer.cancel()

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        queued = self.queued
        self._waiting.remove(waiter)
        waiter.set_exception(SlotTimeout(self.timeout_s, queued, self.size))

    def _give_back(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # straight to the oldest waiter: a slot is never free for a newcomer to take
                return
        self._free += 1

"""Group commit for engines over a network: what concurrent callers queue while a write is in flight goes in the next.

Why: a worker runs many turns at once, and each turn's step records and commit are small fenced writes. Written one
transaction (or one script) each, every one pays a round trip, a server wake-up and a sync to disk; written together
they pay those once. The PostgreSQL and Redis brokers hand such writes to a ``Batcher``: the first write of an idle
batcher goes out at once (a lone write waits for nothing), and the writes queued while it is in flight go out
together in the next transaction, up to ``max_items`` each.

Each write keeps its own promises: its caller is answered only after the transaction that holds it committed, so it
is as durable as alone; each is fenced on its own and gets its own outcome (a ``LeaseLostError`` for one does not
fail the others, as the engine's ``write`` function guarantees). An error of the whole transaction (the server
went away) is every write's error, as it would have been alone. A caller cancelled while its write is queued or in
flight is answered with the cancellation; its write may still happen, as a write cancelled in flight may anyway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

logger = logging.getLogger(__name__)

#: The most writes one transaction carries by default.
DEFAULT_MAX_ITEMS = 64


class Batcher(Generic[ItemT, ResultT]):
    """Writes what concurrent callers submit in shared transactions, one transaction in flight at a time.

    Args:
        write: Writes the items given in one transaction, in order, and returns each one's outcome: its result, or
            the exception its caller gets. Raising fails every item of the call.
        max_items: The most items one call of ``write`` gets.
    """

    def __init__(
        self,
        write: Callable[[Sequence[ItemT]], Awaitable[Sequence[ResultT | BaseException]]],
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        self._write = write
        self._max_items = max_items
        self._queue: collections.deque[tuple[ItemT, asyncio.Future[ResultT]]] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: ItemT) -> ResultT:
        """Write ``item`` in the next transaction and return its result once that transaction has committed.

        Raises:
            Whatever ``write`` gave as this item's outcome, or raised for its whole call.
        """
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._drain(), name="keel-group-commit")
        return await future

    async def _drain(self) -> None:
        while self._queue:
            taken = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_items))]
            try:
                outcomes = await self._write([item for item, _ in taken])
            except BaseException as exc:
                for _, future in taken:
                    _settle(future, exc)
                if isinstance(exc, asyncio.CancelledError):
                    for _, future in self._queue:
                        future.cancel()
                    self._queue.clear()
                    raise
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), outcome in zip(taken, outcomes, strict=True):
                _settle(future, outcome)


def _settle(future: asyncio.Future[ResultT], outcome: ResultT | BaseException) -> None:
    if future.done():
        return  # its caller was cancelled: nobody is waiting for the answer
    if isinstance(outcome, asyncio.CancelledError):
        future.cancel()
    elif isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)

"""A thread of its own for blocking calls, fed by a queue, answering through the caller's event loop.

``loop.run_in_executor`` would do, but each round trip through a ``ThreadPoolExecutor`` costs half as
much again as a bare queue and a future (measured here: 136 µs against 86 µs), and a store makes two per
``update()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

logger = logging.getLogger(__name__)

_STOP = object()


class BlockingThread:
    """Runs submitted functions one at a time, in submission order, on one thread."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the thread and return its result or raise its exception.

        Cancelling the caller does not stop ``fn`` once the thread has started it.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn))
        return await future

    def post(self, fn: Callable[[], object]) -> None:
        """Have the thread run ``fn()`` after the calls already submitted, answering nobody: ``fn`` must not raise."""
        self._queue.put((None, None, fn))

    @property
    def alive(self) -> bool:
        """True until ``stop`` has ended the thread."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Finish the calls already submitted (and what they post meanwhile), then end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def _serve(self) -> None:
        stopping = False
        while True:
            if not stopping:
                item = self._queue.get()
            else:
                try:  # a call run before the stop may have posted a follow-up (more writes): run it too
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
            if item is _STOP:
                stopping = True
                continue
            loop, future, fn = item
            if future is None:
                _run_posted(fn)
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine, not swallowed
                _answer(loop, future, None, exc)
            else:
                _answer(loop, future, result, None)


def _run_posted(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # a posted function answers its callers itself; this thread must keep serving the others
        logger.exception("a call posted to a keel SQLite thread failed")


def _answer(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    def settle() -> None:
        if future.cancelled():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    # A closed loop means nobody is waiting for this answer any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)

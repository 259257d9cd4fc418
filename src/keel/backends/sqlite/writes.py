"""Group commit: the writes waiting for a connection's thread go out in one transaction, with one sync to disk.

Why: with ``synchronous=FULL`` every commit waits for the disk while holding the file's write lock, so under load
the commits a second the disk allows bound every process sharing the file, and writers queue behind each other's
syncs. When several coroutines of a process write at once, ``SqliteDatabase.write`` queues their functions; the
database thread takes every write waiting (up to ``MAX_GROUP``) and runs them one after another between one
``BEGIN IMMEDIATE`` and one ``COMMIT``. A write alone in the queue is a transaction of its own, as before.

Each write keeps its promises: its caller is answered only after the commit, so it is as durable as alone; it is
as atomic as alone, too: in a group each write runs inside a ``SAVEPOINT`` of its own, and one that raises (a fence
that refuses its claim, a compare-and-swap that loses) is rolled back to it and gets its error, while the others
commit. Only an error that ends the whole transaction (SQLite rolls back by itself after a full disk, say) costs
more: the others run again without the failed one, in a new transaction (a write function is a plain function of
the connection, so running it again after a rollback is safe). The order is the order of the queue, so each write
sees the ones before it.

The callers are answered once per group, not once per write: one wake-up of their event loop (``answer``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Iterable, Sequence

T = TypeVar("T")

#: The most writes one transaction runs; more waiting go in the next one, so no group holds the lock for long.
MAX_GROUP = 16

_UNSET: Any = object()

_SAVEPOINT = "SAVEPOINT keel_write"
_ROLLBACK_TO = "ROLLBACK TO keel_write"
_RELEASE = "RELEASE keel_write"


class PendingWrite(Generic[T]):
    """A write waiting for the database thread, and the future its caller awaits on its event loop."""

    __slots__ = ("_error", "_result", "after_commit", "fn", "future", "loop", "read_first")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], T],
        after_commit: Callable[[T], object] | None,
        read_first: Callable[[sqlite3.Connection], T | None] | None,
    ) -> None:
        self.fn = fn
        self.after_commit = after_commit
        self.read_first = read_first
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[T] = self.loop.create_future()
        self._result: T = _UNSET
        self._error: BaseException | None = None

    def succeed(self, result: T) -> None:
        """Record the write's result (committed, or found by ``read_first``)."""
        self._result = result

    def fail(self, error: BaseException) -> None:
        """Record why the write was not made."""
        self._error = error

    def settle(self) -> None:
        """Hand the outcome to the caller; on its event loop's thread. A caller that gave up is not answered."""
        if self.future.done():
            return
        if self._error is not None:
            self.future.set_exception(self._error)
        elif self._result is _UNSET:  # its group was cut short (the thread was interrupted): never report success
            self.future.set_exception(RuntimeError("a keel SQLite write was never run"))
        else:
            self.future.set_result(self._result)


def answer(writes: Iterable[PendingWrite[Any]]) -> None:
    """From the database thread: settle every write's future, with one wake-up of each event loop among them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[PendingWrite[Any]]] = {}
    for write in writes:
        by_loop.setdefault(write.loop, []).append(write)
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting for these answers any more
            loop.call_soon_threadsafe(_settle_all, settled)


def _settle_all(writes: list[PendingWrite[Any]]) -> None:
    for write in writes:
        write.settle()


@dataclass(frozen=True)
class Refused:
    """A write of a group that raised ``error``: rolled back to its savepoint; the others stand."""

    error: Exception


@dataclass(frozen=True)
class GroupFailure:
    """The write at ``index`` raised ``error`` and the transaction went with it: nothing of the group was written."""

    index: int
    error: Exception


def commit_group(conn: sqlite3.Connection, writes: Sequence[PendingWrite[Any]]) -> list[Any] | GroupFailure:
    """Run ``writes`` in order in one ``BEGIN IMMEDIATE`` transaction and commit; return their outcomes.

    Returns:
        Each write's result, committed, or ``Refused`` for one that raised and was rolled back alone; or, if a write's
        error ended the transaction (or it was alone), which one and its error, with everything rolled back.
    """
    alone = len(writes) == 1
    conn.execute("BEGIN IMMEDIATE")
    try:
        outcomes: list[Any] = []
        for index, write in enumerate(writes):
            if not alone:
                conn.execute(_SAVEPOINT)
            try:
                result = write.fn(conn)
            except Exception as exc:  # noqa: BLE001 - handed to that write's caller
                if alone or not conn.in_transaction:
                    rollback(conn)
                    return GroupFailure(index, exc)
                conn.execute(_ROLLBACK_TO)
                conn.execute(_RELEASE)
                outcomes.append(Refused(exc))
                continue
            if not alone:
                conn.execute(_RELEASE)
            outcomes.append(result)
        if all(isinstance(outcome, Refused) for outcome in outcomes):
            rollback(conn)  # nothing to keep: no commit, no sync
        else:
            conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return outcomes


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (as it does after a full disk, say)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")

"""Group commit: the writes waiting for a connection's thread go out in one transaction, with one sync to disk.

Why: with ``synchronous=FULL`` every commit waits for the disk while holding the file's write lock, so under load
the commits a second the disk allows bound every process sharing the file, and writers queue behind each other's
syncs. When several coroutines of a process write at once, ``SqliteDatabase.write`` queues their functions; the
database thread takes every write waiting (up to ``MAX_GROUP``) and runs them one after another between one
``BEGIN IMMEDIATE`` and one ``COMMIT``. A write alone in the queue is a transaction of its own, as before.

Each write keeps its promises: its caller is answered only after the commit, so it is as durable as alone; it is
as atomic as alone, too: when one raises, the transaction is rolled back, that one gets its error, and the others
run again without it in a new transaction (a write function is a plain function of the connection, so running it
again after a rollback is safe). The order is the order of the queue, so each write sees the ones before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Sequence

T = TypeVar("T")

#: The most writes one transaction runs; more waiting go in the next one, so no group holds the lock for long.
MAX_GROUP = 16

_UNSET: Any = object()


class PendingWrite(Generic[T]):
    """A write waiting for the database thread, and then its outcome."""

    __slots__ = ("_error", "_result", "after_commit", "fn", "read_first")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], T],
        after_commit: Callable[[T], object] | None,
        read_first: Callable[[sqlite3.Connection], T | None] | None,
    ) -> None:
        self.fn = fn
        self.after_commit = after_commit
        self.read_first = read_first
        self._result: T = _UNSET
        self._error: BaseException | None = None

    def succeed(self, result: T) -> None:
        """Record the write's result (committed, or found by ``read_first``)."""
        self._result = result

    def fail(self, error: BaseException) -> None:
        """Record why the write was not made."""
        self._error = error

    def outcome(self) -> T:
        """The write's result, or raise its error."""
        if self._error is not None:
            raise self._error
        if self._result is _UNSET:
            raise RuntimeError("a keel SQLite write was never run")  # cannot happen: its flush ran first
        return self._result


@dataclass(frozen=True)
class GroupFailure:
    """The write at ``index`` raised ``error``; the transaction was rolled back, nothing of the group was written."""

    index: int
    error: Exception


def commit_group(conn: sqlite3.Connection, writes: Sequence[PendingWrite[Any]]) -> list[Any] | GroupFailure:
    """Run ``writes`` in order in one ``BEGIN IMMEDIATE`` transaction and commit; return their results.

    Returns:
        Each write's result, committed; or, if one raised, which one and its error, with everything rolled back.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = []
        for index, write in enumerate(writes):
            try:
                results.append(write.fn(conn))
            except Exception as exc:  # noqa: BLE001 - handed to that write's caller
                rollback(conn)
                return GroupFailure(index, exc)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return results


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (as it does after a full disk, say)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")

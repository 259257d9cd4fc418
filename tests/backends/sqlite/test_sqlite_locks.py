"""SQLite writers and the file's write lock: group commit, claims that find nothing, and short busy waits."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import StoreOptions
from keel.backends.sqlite import connection as database_module
from keel.backends.sqlite import writes
from keel.backends.sqlite.backend import SqliteBackend
from tests._engine import APP, claim_one, ref, send

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from keel.backends.sqlite.writes import GroupFailure, PendingWrite


@pytest.fixture
def groups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every transaction ``SqliteDatabase.write`` runs, in order."""
    sizes: list[int] = []
    real = writes.commit_group

    def counted(conn: sqlite3.Connection, writes: Sequence[PendingWrite[Any]]) -> list[Any] | GroupFailure:
        sizes.append(len(writes))
        return real(conn, writes)

    monkeypatch.setattr(database_module, "commit_group", counted)
    return sizes


async def busy_thread(backend: SqliteBackend, seconds: float) -> asyncio.Task[None]:
    """Keep the backend's database thread busy for ``seconds``, so that writes queue up meanwhile."""
    task = asyncio.create_task(backend.database.run(lambda _: time.sleep(seconds)))
    await asyncio.sleep(0.02)
    return task


@pytest.fixture
def write_lock(backend: SqliteBackend) -> Iterator[sqlite3.Connection]:
    """Another connection holding the file's write lock until the test ends (or rolls back itself)."""
    conn = sqlite3.connect(backend.url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


async def test_writes_waiting_together_share_one_transaction(backend: SqliteBackend, groups: list[int]) -> None:
    blocked = await busy_thread(backend, 0.2)
    puts = [backend.store.put(f"k{n}", str(n), expected_version=None, writer="t") for n in range(10)]
    records = await asyncio.gather(*puts)
    await blocked
    assert groups == [10]
    assert [r.version for r in records] == [1] * 10
    assert [(await backend.store.get(f"k{n}")) is not None for n in range(10)] == [True] * 10


async def test_a_write_that_raises_in_a_group_fails_alone(backend: SqliteBackend, groups: list[int]) -> None:
    await backend.store.put("taken", "0", expected_version=None, writer="t")
    blocked = await busy_thread(backend, 0.2)
    outcomes = await asyncio.gather(
        backend.store.put("a", "1", expected_version=None, writer="t"),
        backend.store.put("taken", "1", expected_version=7, writer="t"),
        backend.store.put("b", "1", expected_version=None, writer="t"),
        return_exceptions=True,
    )
    await blocked
    assert isinstance(outcomes[1], keel.StaleWriteError)
    assert groups[-1:] == [3]  # rolled back to its savepoint alone: the others committed in the same transaction
    for key, version in (("a", 1), ("taken", 1), ("b", 1)):
        record = await backend.store.get(key)
        assert record is not None and record.version == version


async def test_a_write_whose_error_ends_the_transaction_fails_alone(backend: SqliteBackend, groups: list[int]) -> None:
    def ends_the_transaction(conn: sqlite3.Connection) -> None:  # as SQLite does itself after a full disk
        conn.execute("INSERT INTO keel_kv (key, version, value, written_at, writer) VALUES ('lost', 1, '1', '', 't')")
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full")

    blocked = await busy_thread(backend, 0.2)
    outcomes = await asyncio.gather(
        backend.store.put("a", "1", expected_version=None, writer="t"),
        backend.database.write(ends_the_transaction),
        backend.store.put("b", "1", expected_version=None, writer="t"),
        return_exceptions=True,
    )
    await blocked
    assert isinstance(outcomes[1], keel.BackendUnavailable)
    assert "full" in str(outcomes[1])
    assert groups[-2:] == [3, 2]  # the whole transaction went: the others ran again, without it
    assert await backend.store.get("lost") is None
    for key in ("a", "b"):
        record = await backend.store.get(key)
        assert record is not None and record.version == 1


async def test_a_group_whose_writes_all_fail_writes_nothing(backend: SqliteBackend, groups: list[int]) -> None:
    await backend.store.put("taken", "0", expected_version=None, writer="t")
    blocked = await busy_thread(backend, 0.2)
    outcomes = await asyncio.gather(
        *(backend.store.put("taken", str(n), expected_version=5, writer="t") for n in range(3)),
        return_exceptions=True,
    )
    await blocked
    assert [type(o) for o in outcomes] == [keel.StaleWriteError] * 3
    assert groups[-1:] == [3]
    record = await backend.store.get("taken")
    assert record is not None and record.version == 1 and record.value_json == "0"


async def test_writes_left_when_the_last_memory_handle_closes_still_run(memory_url: str) -> None:
    first = await open_backend(memory_url, StoreOptions())
    assert isinstance(first, SqliteBackend)
    blocked = await busy_thread(first, 0.1)
    count = 3 * writes.MAX_GROUP  # more than one group: the second is queued after the thread was told to stop
    puts = [first.store.put(f"k{n}", "1", expected_version=None, writer="t") for n in range(count)]
    abandoned = [asyncio.ensure_future(put) for put in puts]
    await asyncio.sleep(0)
    for task in abandoned:
        task.cancel()  # their callers give up; their writes may still happen, and here they do
    await first.aclose()  # the last handle: the thread stops after what was submitted, follow-ups included
    await asyncio.gather(blocked, *abandoned, return_exceptions=True)

    again = await open_backend(memory_url, StoreOptions())
    try:
        await asyncio.wait_for(again.store.put("after", "1", expected_version=None, writer="t"), timeout=5)
        assert [await again.store.get(f"k{n}") is not None for n in range(count)] == [True] * count
    finally:
        await again.aclose()


async def test_after_commit_runs_after_a_commit_only(backend: SqliteBackend) -> None:
    called: list[str] = []

    def refused(conn: sqlite3.Connection) -> str:
        conn.execute("CREATE TABLE t (x)")
        raise RuntimeError("refused")

    def made(conn: sqlite3.Connection) -> str:
        conn.execute("CREATE TABLE t (x)")
        return "made"

    with pytest.raises(RuntimeError, match="refused"):
        await backend.database.write(refused, after_commit=called.append)
    assert await backend.database.write(made, after_commit=called.append) == "made"
    assert called == ["made"]


async def test_a_claim_that_finds_nothing_takes_no_write_lock(
    backend: SqliteBackend, write_lock: sqlite3.Connection
) -> None:
    started = time.monotonic()
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=4) == []
    assert time.monotonic() - started < 1.0  # the lock is held for the whole test: a write would wait 30 s


async def test_a_claim_that_finds_work_waits_for_the_lock(
    backend: SqliteBackend, write_lock: sqlite3.Connection
) -> None:
    write_lock.execute("ROLLBACK")
    await send(backend, ref())
    write_lock.execute("BEGIN IMMEDIATE")
    claiming = asyncio.create_task(claim_one(backend))
    await asyncio.sleep(0.2)
    assert not claiming.done()
    write_lock.execute("ROLLBACK")
    assert (await claiming).instance == ref()


async def test_a_writer_gets_the_lock_soon_after_it_comes_free(backend: SqliteBackend) -> None:
    locked, freed_at = threading.Event(), []

    def hold_write_lock() -> None:  # another process, in a write of 0.33 s
        conn = sqlite3.connect(backend.url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(0.33)
        conn.execute("ROLLBACK")
        freed_at.append(time.monotonic())
        conn.close()

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    locked.wait()
    await backend.store.put("k", "1", expected_version=None, writer="t")
    written_at = time.monotonic()
    holder.join()
    # SQLite's own busy handler would try at 0.328 s and next at 0.428 s, a 0.1 s wait on a free lock.
    assert written_at - freed_at[0] < 0.05

"""SQLite-only broker behaviour: the schema migration, wake-ups by datagram rather than by poll, atomic rollback."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import STATE_HISTORY_LIMIT, MessageStatus, StoreOptions
from keel.backends.sqlite import broker
from keel.backends.sqlite.backend import SqliteBackend
from keel.backends.sqlite.migrate import SCHEMA_VERSION
from tests._engine import APP, claim_one, commit_of, opened, ref, send, timed_wait
from tests.backends.sqlite._support import sql, write_file

if TYPE_CHECKING:
    from pathlib import Path

#: What keel's first SQLite schema (version 1, the store alone) created; a file written by that release.
SCHEMA_V1 = """
CREATE TABLE keel_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE keel_kv (
    key TEXT PRIMARY KEY, version INTEGER NOT NULL, value TEXT, written_at TEXT NOT NULL, writer TEXT NOT NULL
);
CREATE TABLE keel_kv_history (
    key TEXT NOT NULL, version INTEGER NOT NULL, value TEXT, written_at TEXT NOT NULL, writer TEXT NOT NULL,
    PRIMARY KEY (key, version)
) WITHOUT ROWID;
INSERT INTO keel_schema VALUES ('store', 1);
INSERT INTO keel_kv VALUES ('loan:1', 3, '{"step": 3}', '2025-01-01T00:00:00+00:00', 'old-worker');
INSERT INTO keel_kv_history VALUES ('loan:1', 3, '{"step": 3}', '2025-01-01T00:00:00+00:00', 'old-worker');
"""


# --- Opening and the schema ---------------------------------------------------------------------------------


async def test_backend_shares_one_database_with_its_store_and_closes_it_once(sqlite_url: str) -> None:
    backend = await open_backend(sqlite_url, StoreOptions())
    assert isinstance(backend, SqliteBackend)
    assert backend.store.database is backend.database
    assert backend.url == backend.store.url == sqlite_url
    await backend.store.put("k", "1", expected_version=None, writer="t")
    await send(backend, ref())
    await backend.store.aclose()
    await backend.aclose()
    await backend.aclose()
    with pytest.raises(keel.BackendUnavailable, match="closed"):
        await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=1)


async def test_a_version_1_file_is_upgraded_in_place_keeping_its_store(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    write_file(path, SCHEMA_V1)
    async with keel.open_store(f"sqlite:///{path}") as store:  # the store alone migrates too
        old = await store.get("loan:1")
        assert old is not None and (old.value, old.version) == ({"step": 3}, 3)
    assert sql(f"sqlite:///{path}", "SELECT component, version FROM keel_schema") == [("store", SCHEMA_VERSION)]
    backend = await open_backend(f"sqlite:///{path}", StoreOptions())
    try:
        await send(backend, ref())
        claim = await claim_one(backend)
        assert await backend.commit_turn(commit_of(claim, {"ok": True})) == 1
        assert [r.version for r in await backend.store.history("loan:1", limit=10)] == [3]
    finally:
        await backend.aclose()


async def test_a_failed_migration_leaves_the_file_at_its_old_version(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    write_file(path, SCHEMA_V1 + "CREATE TABLE keel_turns (clash INTEGER);")
    with pytest.raises(keel.BackendUnavailable, match="keel_turns"):
        await open_backend(f"sqlite:///{path}", StoreOptions())
    url = f"sqlite:///{path}"
    assert sql(url, "SELECT version FROM keel_schema") == [(1,)]
    assert sql(url, "SELECT name FROM sqlite_master WHERE name = 'keel_instances'") == []  # rolled back whole


async def test_processes_opening_a_new_file_together_migrate_it_once(sqlite_url: str) -> None:
    opened = await asyncio.gather(*(open_backend(sqlite_url, StoreOptions()) for _ in range(4)))
    for backend in opened:
        await backend.aclose()
    assert sql(sqlite_url, "SELECT component, version FROM keel_schema") == [("store", SCHEMA_VERSION)]


# --- Atomic commit, storage ---------------------------------------------------------------------------------


async def test_a_refused_commit_rolls_back_what_it_had_already_written(backend: SqliteBackend) -> None:
    message_id = await send(backend, ref())
    claim = await claim_one(backend)
    # Someone moved the state on behind the lease's back: the state CAS, after the message update, must refuse.
    sql(backend.url, "UPDATE keel_instances SET state_version = 7")
    with pytest.raises(keel.LeaseLostError, match="no longer at version 0"):
        await backend.commit_turn(commit_of(claim, {"lost": True}))
    info = await backend.message(APP, message_id)
    assert info is not None and info.status is MessageStatus.pending
    assert await backend.turns(ref(), limit=5) == []
    assert sql(backend.url, "SELECT lease_owner FROM keel_instances") == [("w1",)]  # the lease was not released


async def test_state_history_is_trimmed_to_the_limit(backend: SqliteBackend) -> None:
    for n in range(STATE_HISTORY_LIMIT + 3):
        await send(backend, ref())
        claim = await claim_one(backend)
        await backend.commit_turn(commit_of(claim, {"n": n}))
    kept = sql(backend.url, "SELECT version FROM keel_state_history ORDER BY version")
    assert [v for (v,) in kept] == list(range(4, STATE_HISTORY_LIMIT + 4))


async def test_leases_are_integer_microseconds_of_the_machine_clock(backend: SqliteBackend) -> None:
    await send(backend, ref())
    before_us = time.time_ns() // 1000
    claim = await claim_one(backend, lease_s=2)
    [(expires_us,)] = sql(backend.url, "SELECT lease_expires_us FROM keel_instances")
    assert isinstance(expires_us, int)
    assert before_us + 2_000_000 <= expires_us <= before_us + 3_000_000
    assert claim.lease_expires_at == datetime.fromtimestamp(0, UTC) + timedelta(microseconds=expires_us)


# --- Waking idle workers ------------------------------------------------------------------------------------


async def test_a_send_through_the_same_backend_wakes_a_waiter_at_once(
    backend: SqliteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker, "POLL_INTERVAL_S", 30.0)  # no poll could explain an early return
    waiting = asyncio.create_task(timed_wait(backend, 10))
    await asyncio.sleep(0.1)
    await send(backend, ref())
    assert await waiting < 1.0


async def test_a_send_from_another_connection_wakes_a_waiter_at_once(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker, "POLL_INTERVAL_S", 30.0)  # its wake-up datagram, not a poll (test_sqlite_wake.py)
    async with opened(sqlite_url) as waiter, opened(sqlite_url) as sender:
        waiting = asyncio.create_task(timed_wait(waiter, 10))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await send(sender, ref())
        await waiting
        assert time.monotonic() - started < 1.0


async def test_a_send_between_an_empty_claim_and_the_wait_is_not_slept_through(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker, "POLL_INTERVAL_S", 30.0)
    async with opened(sqlite_url) as worker, opened(sqlite_url) as sender:
        assert await worker.claim(APP, ["loan"], worker="w1", lease_s=5, limit=2) == []
        await send(sender, ref())  # another process, between the claim and the wait
        assert await timed_wait(worker, 10) < 1.0


async def test_a_claim_that_filled_its_limit_makes_the_next_wait_return_at_once(backend: SqliteBackend) -> None:
    await send(backend, ref("a"))
    await send(backend, ref("b"))
    assert len(await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=1)) == 1
    assert await timed_wait(backend, 10) < 1.0


async def test_a_wait_stuck_behind_a_locked_write_still_ends_on_time(backend: SqliteBackend) -> None:
    locked, release = threading.Event(), threading.Event()

    def hold_write_lock() -> None:  # another process in the middle of a long write
        conn = sqlite3.connect(backend.url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        conn.execute("ROLLBACK")
        conn.close()

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    locked.wait()
    try:
        sending = asyncio.create_task(send(backend, ref()))  # occupies the backend's thread, waiting for the lock
        await asyncio.sleep(0.05)
        assert await timed_wait(backend, 0.3) < 1.0
    finally:
        release.set()
        holder.join()
    await sending

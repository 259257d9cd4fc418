"""SQLite-only broker behaviour: the schema migration, wake-ups, atomic rollback, and claims across connections."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import STATE_HISTORY_LIMIT, InstanceRef, MessageStatus, NewMessage, StoreOptions
from keel.backends.sqlite import broker
from keel.backends.sqlite.backend import SqliteBackend
from keel.backends.sqlite.database import SCHEMA_VERSION
from tests._engine import APP, claim_one, commit_of, opened, ref, send, timed_wait
from tests.backends.sqlite._support import open_sqlite, sql, write_file

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
    assert backend.store.database is backend.database  # type: ignore[attr-defined]
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


async def test_everything_survives_closing_and_reopening(sqlite_url: str) -> None:
    async with opened(sqlite_url) as first:
        done = await send(first, ref())
        waiting = await send(first, ref())
        claim = await claim_one(first)
        await first.commit_turn(commit_of(claim, {"n": 1}))
    async with opened(sqlite_url) as second:
        state = await second.state(ref())
        assert state is not None and (state.value_json, state.version) == ('{"n": 1}', 1)
        info = await second.message(APP, done)
        assert info is not None and (info.status, info.state_version) == (MessageStatus.done, 1)
        [again] = await second.claim(APP, ["loan"], worker="w2", lease_s=5, limit=1)
        assert (again.message_id, again.state_version, again.fencing_token) == (waiting, 1, claim.fencing_token + 1)


async def test_a_resent_message_id_is_appended_once(backend: SqliteBackend) -> None:
    message = NewMessage(ref(), "same-id", "{}")
    assert await backend.send(message) == await backend.send(message) == "same-id"
    assert sql(backend.url, "SELECT count(*) FROM keel_messages") == [(1,)]


# --- Several connections (as several processes) on one file -------------------------------------------------


async def test_one_idempotency_key_sent_through_many_connections_enqueues_once(sqlite_url: str) -> None:
    backends = [await open_sqlite(sqlite_url) for _ in range(4)]
    try:
        ids = await asyncio.gather(*(send(b, ref(), key="req-1") for b in backends for _ in range(3)))
    finally:
        for b in backends:
            await b.aclose()
    assert len(set(ids)) == 1
    assert sql(sqlite_url, "SELECT count(*) FROM keel_messages") == [(1,)]


async def test_claims_through_many_connections_never_share_an_instance(sqlite_url: str) -> None:
    backends = [await open_sqlite(sqlite_url) for _ in range(4)]
    try:
        for n in range(30):
            await send(backends[0], ref(str(n)))
        batches = await asyncio.gather(
            *(
                b.claim(APP, ["loan"], worker=f"w{i}", lease_s=5, limit=4)
                for i, b in enumerate(backends)
                for _ in range(3)
            )
        )
    finally:
        for b in backends:
            await b.aclose()
    claimed = [c.instance for batch in batches for c in batch]
    assert len(claimed) == len(set(claimed)) == 30


@pytest.mark.processes
@pytest.mark.slow
def test_claimers_in_separate_processes_run_every_message_exactly_once(sqlite_url: str) -> None:
    instances, per_instance = 12, 5
    asyncio.run(_open_and_close(sqlite_url))  # the processes race on claims, not on creating the schema
    script = Path(__file__).with_name("claimer.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), sqlite_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    asyncio.run(_send_jobs(sqlite_url, instances, per_instance))
    held = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        held.extend(json.loads(out.strip().splitlines()[-1]))
    assert len(held) == instances * per_instance
    assert len({message_id for _, _, message_id, _ in held}) == len(held)  # no message ran twice
    assert len({(wid, token) for wid, token, _, _ in held}) == len(held)  # no token handed out twice
    for wid in map(str, range(instances)):
        versions = sorted(version for w, _, _, version in held if w == wid)
        assert versions == list(range(1, per_instance + 1))
    final = sql(sqlite_url, "SELECT state, state_version FROM keel_instances")
    assert sorted(final) == [(json.dumps({"n": per_instance}), per_instance)] * instances


async def _send_jobs(url: str, instances: int, per_instance: int) -> None:
    async with opened(url) as sender:
        for _ in range(per_instance):
            for n in range(instances):
                await sender.send(NewMessage(InstanceRef("crowd", "job", str(n)), uuid.uuid4().hex, "{}"))


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


async def test_messages_under_another_workers_lease_do_not_wake_a_waiter(sqlite_url: str) -> None:
    async with opened(sqlite_url) as owner, opened(sqlite_url) as idle:
        await send(owner, ref())
        await send(owner, ref())
        assert len(await owner.claim(APP, ["loan"], worker="owner", lease_s=5, limit=5)) == 1
        assert await idle.claim(APP, ["loan"], worker="idle", lease_s=5, limit=5) == []
        assert await timed_wait(idle, 0.4) >= 0.35  # pending work it cannot take is no reason to spin


async def test_sends_to_another_app_do_not_wake_a_waiter(backend: SqliteBackend) -> None:
    waiting = asyncio.create_task(timed_wait(backend, 0.4))
    await asyncio.sleep(0.05)
    await backend.send(NewMessage(InstanceRef("other-app", "loan", "1"), uuid.uuid4().hex, "{}"))
    assert await waiting >= 0.35


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


async def _open_and_close(url: str) -> None:
    await (await open_sqlite(url)).aclose()

"""PostgreSQL-only broker behaviour: LISTEN/NOTIFY wake-ups and what postgres adds to the wake rule, listener
reconnection, the runtime_v1 migration from a store-only database, what the tables hold, and row locks between a
send and a commit. Claims across backends and processes are in tests/conformance/."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING

import psycopg
import pytest

import keel
from keel.backends.base import STATE_HISTORY_LIMIT, InstanceRef, MessageStatus, StoreOptions
from keel.backends.postgres import migrate as pg_store
from keel.backends.postgres.backend import open_backend
from keel.backends.postgres.transactions import BROKER_QUERIES, channel_for
from tests._engine import APP, claim_all, claim_one, commit_of, ref, send
from tests.backends.postgres._support import backends_opened_together, db_rows, opened_backend, send_params

if TYPE_CHECKING:
    from keel.backends.postgres.backend import PostgresBackend

pytestmark = pytest.mark.postgres


async def _listening(backend: PostgresBackend, app: str) -> None:
    """Wait until the backend's listener has LISTENed on ``app``'s channel."""
    channel = backend.broker.listener.channel(app)
    deadline = time.monotonic() + 5
    while channel not in backend.broker.listener._listening:
        assert time.monotonic() < deadline, "the listener never subscribed"
        await asyncio.sleep(0.01)


async def _timed_wait(backend: PostgresBackend, app: str, timeout_s: float) -> float:
    """Wait for work and return the monotonic time at which the wait returned."""
    await backend.wait_for_work(app, timeout_s=timeout_s)
    return time.monotonic()


# --- Wake-ups ------------------------------------------------------------------------------------------------


async def test_a_notify_from_another_backend_wakes_a_waiter_promptly(
    backend: PostgresBackend, other: PostgresBackend
) -> None:
    waiter = asyncio.create_task(_timed_wait(backend, APP, 10))
    await _listening(backend, APP)
    await asyncio.sleep(0.05)  # the waiter is parked in its read of notifications
    await send(other, ref(), {})
    sent = time.monotonic()
    woke = await waiter
    assert woke - sent < 0.3  # typically a few ms; the margin is for a loaded CI machine, far below the 10 s wait


async def test_work_sent_before_the_first_listen_is_found_at_once(
    backend: PostgresBackend, other: PostgresBackend
) -> None:
    await send(other, ref(), {})  # nobody listens yet: this notification reaches no one
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=10)
    assert time.monotonic() - started < 1.0


async def test_a_waiter_wakes_only_for_the_workflows_its_backend_claims(
    backend: PostgresBackend, other: PostgresBackend
) -> None:
    assert await claim_all(backend) == []  # from now on it waits for "loan" only
    waiter = asyncio.create_task(_timed_wait(backend, APP, 0.5))
    await _listening(backend, APP)
    started = time.monotonic()
    await send(other, InstanceRef(APP, "audit", "1"), {})  # a workflow of the app that this backend never claims
    assert await waiter - started >= 0.4
    waiter = asyncio.create_task(_timed_wait(backend, APP, 10))
    await asyncio.sleep(0.05)
    await send(other, ref(), {})
    sent = time.monotonic()
    assert await waiter - sent < 0.3


async def test_a_send_noticed_before_the_last_claim_does_not_return_the_next_wait(
    backend: PostgresBackend, other: PostgresBackend
) -> None:
    await backend.wait_for_work(APP, timeout_s=0.2)
    await send(other, ref(), {})
    await asyncio.sleep(0.3)  # noticed by the listener before the claim below starts
    assert len(await claim_all(backend)) == 1
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=0.5)  # that claim saw it: nothing to look at again
    assert time.monotonic() - started >= 0.4


async def test_the_listener_reconnects_after_its_connection_is_terminated(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    waiter = asyncio.create_task(_timed_wait(backend, APP, 30))
    await _listening(backend, APP)
    pid = backend.broker.listener.backend_pid
    assert pid is not None
    killed = time.monotonic()
    db_rows(postgres_url, "SELECT pg_terminate_backend(%s)", pid)
    # Notifications may have been lost while it was down: the waiter returns at once, so the worker re-polls.
    assert await waiter - killed < 1.0
    waiter = asyncio.create_task(_timed_wait(backend, APP, 30))
    await _listening(backend, APP)
    assert backend.broker.listener.backend_pid not in {None, pid}
    await send(other, ref(), {})
    sent = time.monotonic()
    assert await waiter - sent < 0.5


async def test_a_dead_idle_listener_is_noticed_by_the_next_wait(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    await backend.wait_for_work(APP, timeout_s=0.2)
    pid = backend.broker.listener.backend_pid
    assert pid is not None
    db_rows(postgres_url, "SELECT pg_terminate_backend(%s)", pid)
    await asyncio.sleep(0.3)
    await send(other, ref(), {})  # lost: nobody listens on a dead connection
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=10)
    assert time.monotonic() - started < 1.0


async def test_aclose_closes_the_listener_connection_and_returns_waiters(postgres_url: str) -> None:
    opened = await open_backend(postgres_url, StoreOptions())
    waiter = asyncio.create_task(_timed_wait(opened, APP, 30))
    await _listening(opened, APP)
    pid = opened.broker.listener.backend_pid
    await opened.aclose()
    await asyncio.wait_for(waiter, 2)
    alive = db_rows(postgres_url, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid)
    assert alive == [(0,)]
    with pytest.raises(keel.BackendUnavailable, match="closed"):
        await opened.wait_for_work(APP, timeout_s=0.1)
    await opened.aclose()


async def test_the_pool_is_not_held_while_waiting(postgres_url: str) -> None:
    async with opened_backend(f"{postgres_url}&pool_min_size=1&pool_max_size=1") as opened:
        waiters = [asyncio.create_task(opened.wait_for_work(APP, timeout_s=2)) for _ in range(5)]
        await _listening(opened, APP)
        started = time.monotonic()
        await send(opened, ref(), {})  # needs the pool's only connection
        assert time.monotonic() - started < 0.5
        await asyncio.wait_for(asyncio.gather(*waiters), 1)


@pytest.mark.parametrize("app", ["Loans", "a" * 255, "ünï cödé / app.name", "keel; DROP TABLE keel_kv --"])
async def test_any_app_name_gets_a_working_channel(backend: PostgresBackend, other: PostgresBackend, app: str) -> None:
    channel = backend.broker.listener.channel(app)
    assert re.fullmatch(r"keel_[a-z0-9_]+", channel)
    assert len(channel.encode()) <= 63
    waiter = asyncio.create_task(_timed_wait(backend, app, 10))
    await _listening(backend, app)
    await send(other, ref(app=app), {})
    sent = time.monotonic()
    assert await waiter - sent < 0.5


def test_channels_differ_by_app_and_by_schema() -> None:
    assert channel_for("s1", "loans") != channel_for("s2", "loans")
    assert channel_for("s1", "a.b") != channel_for("s1", "a_b")
    assert channel_for("s1", "loans") == channel_for("s1", "loans")


# --- Migration and tables ----------------------------------------------------------------------------------


async def test_a_store_only_database_at_schema_version_1_is_migrated(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # What the previous keel created: the bootstrap table and step store_v1, recorded as version 1.
        conn.execute(pg_store._SCHEMA["bootstrap"])
        conn.execute(pg_store._SCHEMA["store_v1"])
        conn.execute(pg_store.QUERIES["record_schema_version"], {"component": "store", "version": 1})
        conn.execute("INSERT INTO keel_kv VALUES ('loan:1', 4, '{\"step\": 4}', now(), 'old')")
        conn.execute("INSERT INTO keel_kv_history VALUES ('loan:1', 4, '{\"step\": 4}', now(), 'old')")
    async with backends_opened_together(postgres_url, 3) as opened:
        assert db_rows(postgres_url, "SELECT component, version FROM keel_schema") == [
            ("store", pg_store.SCHEMA_VERSION)
        ]
        kept = await opened[0].store.get("loan:1")
        assert kept is not None and (kept.version, kept.value_json) == (4, '{"step": 4}')
        await send(opened[1], ref(), {})
        claim = await claim_one(opened[2], lease_s=5)
        assert await opened[0].commit_turn(commit_of(claim, {})) == 1


def test_the_broker_sql_holds_every_statement_it_runs() -> None:
    expected = {"lock_inboxes", "append", "lock_ready", "lease", "renew", "lock_instance", "commit_turn"}
    expected |= {"fail_turn", "release", "message", "state", "turns", "has_work", "listen"}
    expected |= {"record_step", "retry_turn", "dead_letters", "resolve_dead_letter", "prune", "delete_instance"}
    expected |= {"log_events", "logged_event", "events"}
    assert expected <= set(BROKER_QUERIES)
    assert pg_store.SCHEMA_VERSION == 7


async def test_state_history_keeps_the_last_versions(backend: PostgresBackend, postgres_url: str) -> None:
    for n in range(STATE_HISTORY_LIMIT + 3):
        await send(backend, ref(), {"n": n})
        claim = await claim_one(backend, lease_s=5)
        await backend.commit_turn(commit_of(claim, {"n": n}))
    rows = db_rows(postgres_url, "SELECT version, state FROM keel_state_history ORDER BY version")
    assert [v for v, _ in rows] == list(range(4, STATE_HISTORY_LIMIT + 4))
    assert json.loads(rows[-1][1]) == {"n": STATE_HISTORY_LIMIT + 2}


async def test_a_refused_commit_writes_nothing_anywhere(backend: PostgresBackend, postgres_url: str) -> None:
    message_id = await send(backend, ref(), {})
    claim = await claim_one(backend, lease_s=0.2)
    tables = ["keel_instances", "keel_messages", "keel_state_history", "keel_turns"]
    await asyncio.sleep(0.3)
    before = [db_rows(postgres_url, f"SELECT * FROM {table}") for table in tables]
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.commit_turn(commit_of(claim, {}))
    assert [db_rows(postgres_url, f"SELECT * FROM {table}") for table in tables] == before
    info = await backend.message(APP, message_id)
    assert info is not None and info.status is MessageStatus.pending


async def test_a_message_sent_while_a_commit_waits_for_the_row_is_queued_next(
    backend: PostgresBackend, postgres_url: str
) -> None:
    await send(backend, ref(), {"n": 1})
    claim = await claim_one(backend)
    params = send_params(backend)
    # A send caught between its two statements holds the instance row; the commit must wait for it, then see it.
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(BROKER_QUERIES["lock_inboxes"], params)
            committing = asyncio.create_task(backend.commit_turn(commit_of(claim, {"n": 1})))
            await asyncio.sleep(0.3)
            assert not committing.done()
            await conn.execute(BROKER_QUERIES["append"], params)
        assert await committing == 1
    following = await claim_one(backend)
    assert following.message_id == "late"

"""PostgreSQL-only behaviour of durable timers, pruning and instance deletion: the runtime_v3 migration of a database
at schema version 3, the server's clock, the claim's index, idle listeners and timers, fencing tokens across a
delete and a fresh start, and deletes and prunes racing sends and each other."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
import pytest

import keel
from keel.backends.base import MessageStatus, StepRecord
from keel.backends.postgres import broker as pg_broker
from keel.backends.postgres import migrate as pg_store
from keel.backends.postgres.transactions import BROKER_QUERIES
from tests._engine import APP, claim_all, claim_one, commit_of, failure_of, ref, send
from tests.backends.postgres._support import backends_opened_together, db_rows, opened_backend, send_params

if TYPE_CHECKING:
    from keel.backends.postgres.backend import PostgresBackend

pytestmark = pytest.mark.postgres


# --- Migration ---------------------------------------------------------------------------------------------


def _at_schema_version_3(url: str) -> datetime:
    """Create what the previous keel created, with an instance of each kind; return the old messages' send time."""
    sent_at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    with psycopg.connect(url, autocommit=True) as conn:
        for step in ("bootstrap", "store_v1", "runtime_v1", "runtime_v2"):
            conn.execute(pg_store._SCHEMA[step])
        conn.execute(pg_store.QUERIES["record_schema_version"], {"component": "store", "version": 3})
        for workflow_id, paused in (("busy", False), ("paused", True), ("idle", False)):
            conn.execute(
                "INSERT INTO keel_instances (app, workflow, workflow_id, fencing_token, paused)"
                " VALUES ('loans', 'loan', %s, 5, %s)",
                (workflow_id, paused),
            )
        messages = [
            ("busy-1", "busy", "pending", None),
            ("busy-2", "busy", "pending", None),
            ("dead", "paused", "failed", sent_at),
            ("after-dead", "paused", "pending", None),
            ("old-done", "idle", "done", sent_at),
        ]
        for message_id, workflow_id, status, finished_at in messages:
            conn.execute(
                "INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, status, sent_at,"
                " finished_at) VALUES ('loans', %s, 'loan', %s, '{}', %s, %s, %s)",
                (message_id, workflow_id, status, sent_at + timedelta(seconds=len(message_id)), finished_at),
            )
        conn.execute(
            "INSERT INTO keel_steps (app, message_id, name, result, worker, fencing_token, duration_s)"
            " VALUES ('loans', 'old-done', 'pay', '1', 'w0', 5, 0.1)"
        )
        # next_seq as the previous keel kept it: the oldest pending message, or the failed one of a paused instance.
        conn.execute(
            "UPDATE keel_instances AS i SET next_seq = (SELECT min(seq) FROM keel_messages AS m"
            " WHERE m.workflow_id = i.workflow_id AND m.status IN ('pending', 'failed'))"
        )
    return sent_at


async def test_a_database_at_schema_version_3_is_upgraded_in_place(postgres_url: str) -> None:
    sent_at = _at_schema_version_3(postgres_url)
    async with backends_opened_together(postgres_url, 3) as opened:
        assert db_rows(postgres_url, "SELECT component, version FROM keel_schema") == [
            ("store", pg_store.SCHEMA_VERSION)
        ]
        assert db_rows(postgres_url, "SELECT count(*) FROM keel_messages WHERE visible_at <> sent_at") == [(0,)]
        next_of = dict(
            db_rows(
                postgres_url,
                "SELECT i.workflow_id, m.message_id FROM keel_instances AS i"
                " JOIN keel_messages AS m ON m.seq = i.next_seq AND m.visible_at = i.next_visible_at",
            )
        )
        assert next_of == {"busy": "busy-1", "paused": "dead"}
        # Old messages are claimable at once, in their old order; the paused instance is not.
        first = await claim_one(opened[0])
        assert (first.instance, first.message_id, first.fencing_token) == (ref("busy"), "busy-1", 6)
        await opened[1].commit_turn(commit_of(first, {}))
        assert (await claim_one(opened[2])).message_id == "busy-2"
        assert await opened[0].resolve_dead_letter(ref("paused"), skip=False) == "dead"
        assert (await claim_one(opened[1])).message_id == "dead"  # a retried dead letter keeps its place
        # Old finished messages can be pruned, their steps with them.
        cut = sent_at + timedelta(days=1)
        pruned = await opened[2].prune(APP, finished_before=cut, keys_before=cut)
        assert (pruned.messages, await opened[2].message(APP, "old-done")) == (1, None)
        assert db_rows(postgres_url, "SELECT count(*) FROM keel_steps") == [(0,)]
        assert await opened[0].delete_instance(ref("idle")) is True


# --- Durable timers ----------------------------------------------------------------------------------------


async def test_a_timer_is_due_by_the_servers_clock_and_stored_durably(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    message_id = await send(backend, ref(), {}, delay_s=30)
    [(delay, next_matches)] = db_rows(
        postgres_url,
        "SELECT m.visible_at - m.sent_at, (i.next_visible_at, i.next_seq) = (m.visible_at, m.seq)"
        " FROM keel_messages AS m JOIN keel_instances AS i USING (app, workflow, workflow_id)",
    )
    assert (delay, next_matches) == (timedelta(seconds=30), True)
    assert await claim_all(other) == []
    db_rows(postgres_url, "UPDATE keel_messages SET visible_at = clock_timestamp()")  # as if the time had come
    db_rows(postgres_url, "UPDATE keel_instances SET next_visible_at = clock_timestamp()")
    assert (await claim_one(other)).message_id == message_id


async def test_only_visible_work_wakes_a_new_listener(backend: PostgresBackend, postgres_url: str) -> None:
    await send(backend, ref("timer"), {}, delay_s=3600)
    await send(backend, ref("soon"), {}, delay_s=0.2)
    async with opened_backend(postgres_url) as listener:
        started = time.monotonic()
        await listener.wait_for_work(APP, timeout_s=0.4)  # neither timer is due when it subscribes
        assert time.monotonic() - started >= 0.3
    await asyncio.sleep(0.2)
    async with opened_backend(postgres_url) as listener:
        started = time.monotonic()
        await listener.wait_for_work(APP, timeout_s=10)  # one is due now
        assert time.monotonic() - started < 1.0


async def test_sending_a_timer_wakes_no_waiter(backend: PostgresBackend, other: PostgresBackend) -> None:
    waiter = asyncio.create_task(backend.wait_for_work(APP, timeout_s=0.6))
    await asyncio.sleep(0.3)  # the listener has subscribed and found no work
    await send(other, ref(), {}, delay_s=3600)
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await send(other, ref(), {})
    await asyncio.wait_for(waiter, 0.5)


def test_claims_scan_the_ready_index_only_up_to_the_servers_now(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for step in ("bootstrap", "store_v1", "runtime_v1", "runtime_v2", "runtime_v3"):
            conn.execute(pg_store._SCHEMA[step])
        conn.execute("SET enable_seqscan = off")
        params = {"app": APP, "workflows": ["loan"], "limit": 10}
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {BROKER_QUERIES['lock_ready']}", params))
    assert "keel_instances_ready" in plan
    assert re.search(r"Index Cond: .*next_visible_at <= \$0", plan), plan


# --- Deleting instances ------------------------------------------------------------------------------------


async def test_fencing_tokens_go_on_growing_across_a_delete_and_a_fresh_start(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    await send(backend, ref(), {})
    stale = await claim_one(backend)
    assert await other.delete_instance(ref()) is True
    assert db_rows(postgres_url, "SELECT fencing_token FROM keel_instance_tombstones") == [(stale.fencing_token,)]
    await send(other, ref(), {})  # started afresh before the old claim's worker tried anything
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_instance_tombstones") == [(0,)]
    for refused in (
        backend.commit_turn(commit_of(stale, {})),
        backend.record_step(StepRecord(stale, "pay", "1", "w1", 0.01)),
        backend.retry_turn(failure_of(stale), delay_s=0),
        backend.fail_turn(failure_of(stale)),
    ):
        with pytest.raises(keel.LeaseLostError, match="the instance was deleted"):
            await refused
    assert await backend.renew([stale], lease_s=30) == [False]
    fresh = await claim_one(other)
    assert (fresh.fencing_token, fresh.state_version, fresh.attempt) == (stale.fencing_token + 1, 0, 1)
    assert await other.commit_turn(commit_of(fresh, {"n": 1})) == 1
    assert await backend.delete_instance(ref()) is True
    assert db_rows(postgres_url, "SELECT fencing_token FROM keel_instance_tombstones") == [(fresh.fencing_token,)]


async def test_a_deleted_instance_leaves_no_row_anywhere(backend: PostgresBackend, postgres_url: str) -> None:
    await send(backend, ref(), {}, key="k")
    claim = await claim_one(backend)
    await backend.record_step(StepRecord(claim, "pay", "1", "w1", 0.01))
    await backend.commit_turn(commit_of(claim, {"n": 1}))
    await send(backend, ref(), {})
    await backend.fail_turn(failure_of(await claim_one(backend)))
    await send(backend, ref(), {}, delay_s=3600)
    await send(backend, ref("other"), {})
    assert await backend.delete_instance(ref()) is True
    assert await backend.delete_instance(ref()) is False
    for table in ("keel_instances", "keel_messages", "keel_state_history", "keel_turns"):
        assert db_rows(postgres_url, f"SELECT DISTINCT workflow_id FROM {table}") in ([], [("other",)]), table
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_steps") == [(0,)]
    assert await backend.dead_letters(APP, limit=5) == []


async def test_a_delete_waits_for_a_send_in_progress_and_takes_its_message_too(
    backend: PostgresBackend, postgres_url: str
) -> None:
    await send(backend, ref(), {})
    params = send_params(backend)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(BROKER_QUERIES["lock_inboxes"], params)
            deleting = asyncio.create_task(backend.delete_instance(ref()))
            await asyncio.sleep(0.3)
            assert not deleting.done()
            await conn.execute(BROKER_QUERIES["append"], params)
        assert await deleting is True
    assert await backend.message(APP, "late") is None
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_instances") == [(0,)]


# --- Pruning -----------------------------------------------------------------------------------------------


async def test_prune_works_in_batches_and_concurrent_prunes_share_the_work(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_broker, "PRUNE_BATCH", 2)
    for n in range(7):
        await send(backend, ref(str(n)), {})
        claim = await claim_one(backend)
        await backend.record_step(StepRecord(claim, "pay", "1", "w1", 0.01))
        await backend.commit_turn(commit_of(claim, {"n": n}))
    pending = await send(backend, ref("waiting"), {})
    soon = datetime.now(UTC) + timedelta(seconds=5)
    results = await asyncio.gather(
        *((backend if n % 2 else other).prune(APP, finished_before=soon, keys_before=soon) for n in range(4))
    )
    assert (sum(r.messages for r in results), sum(r.turns for r in results)) == (7, 7)
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_steps") == [(0,)]
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_state_history") == [(7,)]  # never pruned
    info = await backend.message(APP, pending)
    assert info is not None and info.status is MessageStatus.pending

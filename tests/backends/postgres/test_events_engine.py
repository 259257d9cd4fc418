"""PostgreSQL-only behaviour of events and handler deliveries: the runtime_v4 migration of a database at schema
version 4, what the event log holds, a commit's sends and events in its one transaction, the lock order that keeps
commits sending to each other's instances (and renewals) from deadlocking, concurrent publishes of one key, and
pruning of events and of finished deliveries' instances."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
import pytest

import keel
from keel.backends.postgres import broker as pg_broker
from keel.backends.postgres import migrate as pg_store
from keel.backends.postgres.transactions import BROKER_QUERIES
from tests._engine import (
    APP,
    ack_of,
    claim_all,
    claim_deliveries,
    claim_one,
    commit_of,
    new_event,
    new_message,
    ref,
    send,
    step_of,
)
from tests.backends.postgres._support import (
    RUNTIME_TABLES,
    backends_opened_together,
    db_rows,
    opened_backend,
    send_params,
    snapshot,
)

if TYPE_CHECKING:
    from keel.backends.postgres.backend import PostgresBackend

pytestmark = pytest.mark.postgres


# --- Migration ---------------------------------------------------------------------------------------------


def _at_schema_version_4(url: str) -> None:
    """Create what the previous keel created, with one instance and a message waiting in its inbox."""
    with psycopg.connect(url, autocommit=True) as conn:
        for step in ("bootstrap", "store_v1", "runtime_v1", "runtime_v2", "runtime_v3"):
            conn.execute(pg_store._SCHEMA[step])
        conn.execute(pg_store.QUERIES["record_schema_version"], {"component": "store", "version": 4})
        conn.execute(
            "INSERT INTO keel_instances (app, workflow, workflow_id, fencing_token) VALUES (%s, 'loan', '42', 3)",
            (APP,),
        )
        conn.execute(
            "INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, visible_at)"
            " VALUES (%s, 'old', 'loan', '42', '{}', clock_timestamp())",
            (APP,),
        )
        conn.execute(
            "UPDATE keel_instances SET (next_seq, next_visible_at) = (SELECT seq, visible_at FROM keel_messages)"
        )


async def test_a_database_at_schema_version_4_is_upgraded_in_place(postgres_url: str) -> None:
    _at_schema_version_4(postgres_url)
    async with backends_opened_together(postgres_url, 3) as opened:
        assert db_rows(postgres_url, "SELECT component, version FROM keel_schema") == [
            ("store", pg_store.SCHEMA_VERSION)
        ]
        claim = await claim_one(opened[0])
        assert (claim.message_id, claim.fencing_token) == ("old", 4)
        event = new_event(source=claim)
        assert await opened[1].commit_turn(commit_of(claim, {"n": 1}, events=(event,))) == 1
        assert [row.event_id for row in await opened[2].events(APP, limit=5)] == [event.event_id]
        assert [c.instance.workflow_id for c in await claim_deliveries(opened[0])] == [event.event_id]


# --- The event log -----------------------------------------------------------------------------------------


async def test_the_log_holds_an_events_fields_and_the_servers_publish_time(
    backend: PostgresBackend, postgres_url: str
) -> None:
    await send(backend, ref(), {})
    claim = await claim_one(backend)
    event = new_event(("mail", "audit"), key="loan-42-approved", source=claim, payload={"loan": "42"}, type="Approved")
    await backend.commit_turn(commit_of(claim, {}, events=(event,)))
    [row] = db_rows(
        postgres_url,
        "SELECT event_id, type, payload, handlers, source_app, source_workflow, source_workflow_id,"
        " source_message_id, idempotency_key, clock_timestamp() - published_at FROM keel_events",
    )
    assert row[:9] == (
        event.event_id,
        "Approved",
        '{"loan": "42"}',
        ["mail", "audit"],
        APP,
        "loan",
        "42",
        claim.message_id,
        "loan-42-approved",
    )
    assert timedelta(0) <= row[9] < timedelta(seconds=5)
    [logged] = await backend.events(APP, limit=1)
    assert (logged.handlers, logged.source, logged.published_at.tzinfo) == (("mail", "audit"), claim.instance, UTC)


def test_the_log_is_read_newest_first_by_its_index(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for step in ("bootstrap", *(f"runtime_v{n}" for n in range(1, 5))):
            conn.execute(pg_store._SCHEMA[step])
        conn.execute("SET enable_seqscan = off")
        params = {"app": APP, "limit": 10}
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {BROKER_QUERIES['events']}", params))
    assert "Index Scan Backward using keel_events_log" in plan, plan


async def test_concurrent_publishes_of_one_key_append_one_event_and_its_deliveries(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    events = [new_event(("mail", "audit"), key="once") for _ in range(10)]
    ids = await asyncio.gather(*((backend if n % 2 else other).publish(e) for n, e in enumerate(events)))
    assert len(set(ids)) == 1
    assert db_rows(postgres_url, "SELECT event_id FROM keel_events") == [(ids[0],)]
    # Only the appended event's deliveries were sent, and no instance row was made for the others.
    assert db_rows(postgres_url, "SELECT DISTINCT workflow_id FROM keel_messages") == [(ids[0],)]
    assert db_rows(postgres_url, "SELECT DISTINCT workflow_id FROM keel_instances") == [(ids[0],)]


# --- Commits with sends and events -------------------------------------------------------------------------


async def test_a_refused_commit_with_sends_and_events_writes_nothing_anywhere(
    backend: PostgresBackend, postgres_url: str
) -> None:
    await send(backend, ref(), {})
    claim = await claim_one(backend, lease_s=0.2)
    await asyncio.sleep(0.3)
    tables = (*RUNTIME_TABLES, "keel_instance_tombstones")
    before = snapshot(postgres_url, tables)
    commit = commit_of(
        claim, {}, sends=(new_message(ref("0")), new_message(ref("9"))), events=(new_event(("mail", "audit")),)
    )
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.commit_turn(commit)
    assert snapshot(postgres_url, tables) == before


async def test_a_delivery_acknowledged_writes_no_state(backend: PostgresBackend, postgres_url: str) -> None:
    await backend.publish(new_event())
    [claim] = await claim_deliveries(backend)
    assert await backend.commit_turn(ack_of(claim)) == 0
    assert db_rows(postgres_url, "SELECT state, state_version, state_written_at FROM keel_instances") == [
        (None, 0, None)
    ]
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_state_history") == [(0,)]
    [(finished_at,)] = db_rows(postgres_url, "SELECT finished_at FROM keel_messages WHERE status = 'done'")
    assert finished_at is not None


async def test_commits_sending_to_each_others_instances_do_not_deadlock(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    await send(backend, ref("a"), {})
    await send(backend, ref("b"), {})
    by_id = {c.instance.workflow_id: c for c in await claim_all(backend)}
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        async with conn.transaction():
            # Hold instance a: both commits line up behind it, and must then take a and b in the same order.
            await conn.execute(BROKER_QUERIES["lock_instance"], {"app": APP, "workflow": "loan", "workflow_id": "a"})
            commits = [
                asyncio.create_task(backend.commit_turn(commit_of(by_id["a"], {}, sends=(new_message(ref("b")),)))),
                asyncio.create_task(other.commit_turn(commit_of(by_id["b"], {}, sends=(new_message(ref("a")),)))),
            ]
            await asyncio.sleep(0.3)
            assert not any(task.done() for task in commits)
        # A deadlock would be found and broken within the server's deadlock_timeout (1 s by default).
        assert await asyncio.wait_for(asyncio.gather(*commits), 5) == [1, 1]
    assert sorted(c.instance.workflow_id for c in await claim_all(backend)) == ["a", "b"]


async def test_a_renewal_and_a_commit_sending_to_a_renewed_instance_do_not_deadlock(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    await send(backend, ref("a"), {})
    await send(backend, ref("b"), {})
    by_id = {c.instance.workflow_id: c for c in await claim_all(backend)}
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(BROKER_QUERIES["lock_instance"], {"app": APP, "workflow": "loan", "workflow_id": "a"})
            committing = asyncio.create_task(
                other.commit_turn(commit_of(by_id["b"], {}, sends=(new_message(ref("a")),)))
            )
            renewing = asyncio.create_task(backend.renew([by_id["b"], by_id["a"]], lease_s=30))
            await asyncio.sleep(0.3)
            assert not committing.done() and not renewing.done()
        assert await asyncio.wait_for(committing, 5) == 1
        renewed = await asyncio.wait_for(renewing, 5)
    assert renewed[1] is True  # a's lease, whichever went first; b's is gone if the commit did


async def test_a_refused_or_failed_write_leaves_its_connection_clean(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes run in pipeline mode between a plain BEGIN and COMMIT: whatever stops one, its transaction ends there,
    and the pool's one connection goes on serving (the pool would warn if it had to roll back a returned one)."""
    async with opened_backend(f"{postgres_url}&pool_min_size=1&pool_max_size=1&query_timeout_s=0.5") as backend:
        await send(backend, ref(), {})
        claim = await claim_one(backend)
        await backend.release(claim)
        with pytest.raises(keel.LeaseLostError):
            await backend.commit_turn(commit_of(claim, {}, sends=(new_message(ref("9")),), events=(new_event(),)))
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn, conn.transaction():
            await conn.execute(BROKER_QUERIES["lock_instance"], {"app": APP, "workflow": "loan", "workflow_id": "42"})
            with pytest.raises(keel.BackendUnavailable, match="statement timeout"):
                await send(backend, ref(), {})
        await send(backend, ref("9"), {})
        assert await backend.publish(new_event()) is not None
        assert sorted(c.instance.workflow_id for c in await claim_all(backend)) == ["42", "9"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


# --- Pruning -----------------------------------------------------------------------------------------------


async def test_a_finished_delivery_is_pruned_whole_without_a_tombstone(
    backend: PostgresBackend, postgres_url: str
) -> None:
    event = new_event(("mail", "audit"))
    await backend.publish(event)
    [mail] = await claim_deliveries(backend, "mail")
    await backend.record_step(step_of(mail, "smtp", "ok"))
    await backend.commit_turn(ack_of(mail))
    await send(backend, ref(), {})
    await backend.commit_turn(commit_of(await claim_one(backend), {"n": 1}))
    soon = datetime.now(UTC) + timedelta(seconds=5)
    pruned = await backend.prune(APP, finished_before=soon, keys_before=soon)
    assert (pruned.messages, pruned.events) == (2, 1)
    # The mail delivery left no row; the audit delivery waits on, and the workflow's instance keeps its state.
    for table in ("keel_instances", "keel_messages", "keel_turns", "keel_state_history"):
        assert ("on/mail",) not in db_rows(postgres_url, f"SELECT DISTINCT workflow FROM {table}"), table
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_steps") == [(0,)]
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_instance_tombstones") == [(0,)]
    assert db_rows(postgres_url, "SELECT workflow, state_version FROM keel_instances ORDER BY 1") == [
        ("loan", 1),
        ("on/audit", 0),
    ]
    assert [c.instance.workflow_id for c in await claim_deliveries(backend, "audit")] == [event.event_id]


async def test_a_delivery_sent_again_while_prune_deletes_its_instance_keeps_it(
    backend: PostgresBackend, postgres_url: str
) -> None:
    event = new_event()
    await backend.publish(event)
    [claim] = await claim_deliveries(backend)
    await backend.commit_turn(ack_of(claim))
    # The event is published again (its log row pruned, say) by a send caught between its two statements.
    params = {**send_params(backend, "again"), "workflow": "on/mail", "workflow_id": event.event_id}
    params.update(workflows=["on/mail"], workflow_ids=[event.event_id], kinds=["delivery"])
    soon = datetime.now(UTC) + timedelta(seconds=5)
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute(BROKER_QUERIES["lock_inboxes"], params)
            pruning = asyncio.create_task(backend.prune(APP, finished_before=soon, keys_before=soon))
            await asyncio.sleep(0.3)
            assert not pruning.done()
            await conn.execute(BROKER_QUERIES["append"], params)
        assert (await pruning).messages == 1
    assert [c.message_id for c in await claim_deliveries(backend)] == ["again"]


async def test_every_foreign_key_has_an_index_to_check_deletes_by(backend: PostgresBackend, postgres_url: str) -> None:
    """Deleting a referenced row looks up its referencing rows: without an index on the referencing columns each
    delete scans the whole table (prune deletes finished deliveries' instances by the thousand)."""
    keys = db_rows(
        postgres_url,
        "SELECT c.conrelid::regclass::text, c.conkey FROM pg_constraint AS c"
        " WHERE c.contype = 'f' AND c.connamespace = current_schema()::regnamespace",
    )
    indexes = db_rows(
        postgres_url,
        "SELECT i.indrelid::regclass::text, i.indkey::int2[]"
        " FROM pg_index AS i JOIN pg_class AS t ON t.oid = i.indrelid"
        " WHERE t.relnamespace = current_schema()::regnamespace AND i.indpred IS NULL",
    )
    assert {table for table, _ in keys} == {"keel_messages", "keel_state_history", "keel_turns", "keel_steps"}
    for table, columns in keys:
        assert any(t == table and list(key[: len(columns)]) == columns for t, key in indexes), table


async def test_prune_deletes_events_in_batches_and_concurrent_prunes_share_them(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_broker, "PRUNE_BATCH", 2)
    for n in range(7):
        await backend.publish(new_event((), key=f"k{n}" if n % 2 else None))
    soon = datetime.now(UTC) + timedelta(seconds=5)
    results = await asyncio.gather(
        *((backend if n % 2 else other).prune(APP, finished_before=soon, keys_before=soon) for n in range(4))
    )
    assert sum(r.events for r in results) == 7
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_events") == [(0,)]

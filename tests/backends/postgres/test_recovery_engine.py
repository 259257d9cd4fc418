"""PostgreSQL-only behaviour of steps, retries and dead letters: the runtime_v2 migration of a database at schema
version 2, what the rows hold, refused writes that write nothing, and holds by the server's clock."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
import pytest

import keel
from keel.backends.base import MessageStatus, StepRecord
from keel.backends.postgres import migrate as pg_store
from tests._engine import APP, claim_one, failure_of, ref, send, step_of
from tests.backends.postgres._support import backends_opened_together, db_rows, snapshot

if TYPE_CHECKING:
    from keel.backends.postgres.backend import PostgresBackend

pytestmark = pytest.mark.postgres


# --- Migration ---------------------------------------------------------------------------------------------


async def test_a_database_at_schema_version_2_is_upgraded_in_place(postgres_url: str) -> None:
    failed_at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # What the previous keel created: steps store_v1 and runtime_v1, recorded as version 2, with a paused
        # instance whose first message failed (finished_at set by the old fail_turn) and a second one waiting.
        conn.execute(pg_store._SCHEMA["bootstrap"])
        conn.execute(pg_store._SCHEMA["store_v1"])
        conn.execute(pg_store._SCHEMA["runtime_v1"])
        conn.execute(pg_store.QUERIES["record_schema_version"], {"component": "store", "version": 2})
        conn.execute(
            "INSERT INTO keel_instances (app, workflow, workflow_id, fencing_token, paused, state, state_version)"
            " VALUES ('loans', 'loan', '42', 3, true, '{\"n\": 2}', 2)"
        )
        conn.execute(
            "INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, status, attempts, error,"
            " finished_at) VALUES ('loans', 'dead', 'loan', '42', '{}', 'failed', 3, 'ValueError: old', %s)",
            (failed_at,),
        )
        conn.execute(
            "INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload)"
            " VALUES ('loans', 'later', 'loan', '42', '{}')"
        )
        conn.execute("UPDATE keel_instances SET next_seq = (SELECT seq FROM keel_messages WHERE message_id = 'dead')")
    async with backends_opened_together(postgres_url, 3) as opened:
        assert db_rows(postgres_url, "SELECT component, version FROM keel_schema") == [
            ("store", pg_store.SCHEMA_VERSION)
        ]
        [dead] = await opened[0].dead_letters(APP, limit=10)
        assert (dead.instance, dead.message_id, dead.error, dead.attempts) == (ref(), "dead", "ValueError: old", 3)
        assert dead.failed_at == failed_at
        assert await opened[1].resolve_dead_letter(ref(), skip=True) == "dead"  # the new status is allowed
        info = await opened[2].message(APP, "dead")
        assert info is not None and info.status is MessageStatus.skipped
        claim = await claim_one(opened[0])
        assert (claim.message_id, claim.state_version, claim.steps) == ("later", 2, {})
        await opened[1].record_step(step_of(claim, "score", 0.5))
        await opened[2].release(claim)
        assert (await claim_one(opened[0])).steps == {"score": "0.5"}


async def test_the_status_constraint_still_refuses_unknown_statuses(
    backend: PostgresBackend, postgres_url: str
) -> None:
    message_id = await send(backend, ref(), {})
    with pytest.raises(psycopg.errors.CheckViolation):
        db_rows(postgres_url, "UPDATE keel_messages SET status = 'lost' WHERE message_id = %s", message_id)


# --- Steps -------------------------------------------------------------------------------------------------


async def test_a_step_row_says_who_recorded_it_under_which_token(backend: PostgresBackend, postgres_url: str) -> None:
    message_id = await send(backend, ref(), {})
    claim = await claim_one(backend)
    await backend.record_step(StepRecord(claim, "pay", '{"paid": 1}', "w1", 0.25))
    await backend.record_step(StepRecord(claim, "pay", '{"paid": 2}', "w2", 0.5))
    rows = db_rows(
        postgres_url, "SELECT app, message_id, name, result, worker, fencing_token, duration_s FROM keel_steps"
    )
    assert rows == [(APP, message_id, "pay", '{"paid": 1}', "w1", claim.fencing_token, 0.25)]


async def test_refused_steps_and_retries_write_nothing_anywhere(backend: PostgresBackend, postgres_url: str) -> None:
    await send(backend, ref(), {})
    released = await claim_one(backend)
    await backend.release(released)
    expired = await claim_one(backend, lease_s=0.2)
    await asyncio.sleep(0.3)
    before = snapshot(postgres_url)
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.record_step(step_of(released, "pay", 1))
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.record_step(step_of(expired, "pay", 1))
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.retry_turn(failure_of(expired), delay_s=5)
    assert snapshot(postgres_url) == before


# --- Retries -----------------------------------------------------------------------------------------------


async def test_a_retry_holds_the_instance_by_the_servers_clock(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    message_id = await send(backend, ref(), {})
    claim = await claim_one(backend)
    await backend.retry_turn(failure_of(claim), delay_s=30)
    [(owner, held_for, attempts)] = db_rows(
        postgres_url,
        "SELECT i.lease_owner, i.lease_expires_at - clock_timestamp(), m.attempts"
        " FROM keel_instances AS i JOIN keel_messages AS m ON m.seq = i.next_seq",
    )
    assert owner is None and timedelta(seconds=29) < held_for <= timedelta(seconds=30)
    assert attempts == 1
    # Released: nothing under the old token works, and its release does not drop the hold.
    for refused in (backend.record_step(step_of(claim, "x", 1)), backend.retry_turn(failure_of(claim), delay_s=0)):
        with pytest.raises(keel.LeaseLostError, match="released"):
            await refused
    assert await backend.renew([claim], lease_s=30) == [False]
    await backend.release(claim)
    assert await other.claim(APP, ["loan"], worker="w2", lease_s=30, limit=5) == []
    started = time.monotonic()
    await other.wait_for_work(APP, timeout_s=0.3)  # a held instance is no work for a new listener either
    assert time.monotonic() - started >= 0.25
    db_rows(postgres_url, "UPDATE keel_instances SET lease_expires_at = clock_timestamp()")  # the delay is over
    again = await claim_one(other)
    assert (again.message_id, again.attempt) == (message_id, 2)


# --- Dead letters ------------------------------------------------------------------------------------------


async def test_a_retried_dead_letter_starts_clean(backend: PostgresBackend, postgres_url: str) -> None:
    dead_id = await send(backend, ref(), {})
    claim = await claim_one(backend)
    await backend.record_step(step_of(claim, "pay", {"paid": 1}))
    await backend.fail_turn(failure_of(claim))
    assert await backend.resolve_dead_letter(ref(), skip=False) == dead_id
    [row] = db_rows(postgres_url, "SELECT status, attempts, error, finished_at FROM keel_messages")
    assert row == ("pending", 0, None, None)
    again = await claim_one(backend)
    assert (again.attempt, again.steps) == (1, {"pay": '{"paid": 1}'})  # recorded steps are not run again

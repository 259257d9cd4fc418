"""PostgreSQL-only: the broker's scripts (scripts.py), prepared once per connection and run as one transaction.

What they do for the contract (sends, claims, fenced writes) is the conformance suite's; here is what only this
engine shows: the types the server inferred for each prepared parameter, one transaction per script, and concurrent
sends sharing transactions.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import psycopg
import pytest

from keel.backends.postgres.scripts import PREPARED, Script
from tests._engine import new_message, ref
from tests.backends.postgres._support import db_rows, send_params

if TYPE_CHECKING:
    from keel.backends.postgres.backend import PostgresBackend

pytestmark = pytest.mark.postgres

#: The type each parameter of a scripted statement must have: what the Python value bound to it is.
EXPECTED_TYPES = {
    **dict.fromkeys(
        (
            "app",
            "workflow",
            "workflow_id",
            "message_id",
            "payload",
            "idempotency_key",
            "channel",
            "end_channel",
            "worker",
            "state",
        ),
        "text",
    ),
    **dict.fromkeys(("name", "result", "outcome", "error"), "text"),
    **dict.fromkeys(("apps", "workflows", "workflow_ids", "kinds"), "text[]"),
    **dict.fromkeys(("delay_s", "lease_s", "duration_s"), "double precision"),
    **dict.fromkeys(("fencing_token", "version_read", "history_limit", "limit"), "bigint"),
    "attempt": "integer",
    "started_at": "timestamp with time zone",
}


async def test_every_prepared_parameter_has_the_type_of_the_value_it_gets(backend: PostgresBackend) -> None:
    # The server infers them from the SQL; a wrong one (0.5 taken for an integer) would fail only some calls.
    async with backend.broker._connection.connection() as conn:
        cursor = await conn.execute("SELECT name, parameter_types::text[] FROM pg_prepared_statements")
        prepared = dict(await cursor.fetchall())
    for name, statement in PREPARED.items():
        types = prepared[statement.statement]
        assert dict(zip(statement.names, types, strict=True)) == {p: EXPECTED_TYPES[p] for p in statement.names}, name


async def test_a_script_is_one_transaction_a_failing_statement_writes_nothing_of_it(
    backend: PostgresBackend, postgres_url: str
) -> None:
    params = send_params(backend, "first")
    script = Script()
    script.add("lock_inboxes", params)  # creates instance 42 and locks it
    script.add("append", params)
    script.add("append", {**params, "message_id": "orphan", "workflow_id": "never-created"})  # refused: foreign key
    async with backend.broker._connection.connection() as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            await script.run(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # rolled back, not left open
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_instances") == [(0,)]
    assert db_rows(postgres_url, "SELECT count(*) FROM keel_messages") == [(0,)]


async def test_concurrent_sends_of_one_backend_share_transactions(backend: PostgresBackend, postgres_url: str) -> None:
    messages = [new_message(ref(str(n))) for n in range(20)]
    ids = await asyncio.gather(*(backend.send(m) for m in messages))
    assert ids == [m.message_id for m in messages]
    # The first goes out at once, the others queue behind it and go together: two transactions, not twenty.
    [(transactions,)] = db_rows(postgres_url, "SELECT count(DISTINCT xmin::text) FROM keel_messages")
    assert transactions <= 2


async def test_a_script_prepares_again_what_a_rollback_of_psycopgs_dropped(backend: PostgresBackend) -> None:
    # psycopg sends DEALLOCATE ALL when it rolls back a connection that holds statements it prepared itself.
    script = Script()
    script.add("lock_ready", {"app": "nobody", "workflows": ["loan"], "limit": 1})
    leased = script.add("lease", {"app": "nobody", "worker": "w1", "lease_s": 1.0})
    async with backend.broker._connection.connection() as conn:
        await conn.execute("DEALLOCATE ALL")
        assert (await script.run(conn))[leased] == []
        cursor = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
        assert await cursor.fetchone() == (len(PREPARED),)

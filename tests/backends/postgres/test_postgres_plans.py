"""The plans of the statements every turn runs, on tables of about 100,000 rows: each finds its rows by index.

PostgreSQL plans by the tables' statistics, so the tables are filled first (straight in SQL, in about a second) with
what makes a turn's cost grow if a plan is wrong: 5,000 instances of another workflow with 50,000 messages ready to
run, 2,500 instances of the claimed workflow with 25,000 timers not due yet, one instance with 10,000 done messages
(each with a step) and turn records and 25,000 pending ones, 40,000 turn records and 25,000 kept states of other
instances, and 10,000 deleted instances; then ANALYZE. Some thousands of instances is where a join with the
instances once turned into a hash of all of them. ``bench/growth.py`` measures the curves; these tests pin the plans
that keep them flat.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from keel.backends.postgres.transactions import BROKER_QUERIES
from tests.backends.postgres._support import opened_backend

if TYPE_CHECKING:
    from collections.abc import Iterator

FILL = """
INSERT INTO keel_instances (app, workflow, workflow_id, next_seq, next_visible_at)
SELECT 'a', 'parked', 'p' || n, n, clock_timestamp() FROM generate_series(1, 5000) AS n;
INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, visible_at)
SELECT 'a', 'p' || n, 'parked', 'p' || (n % 5000 + 1), '{}', clock_timestamp() FROM generate_series(1, 50000) AS n;
INSERT INTO keel_instances (app, workflow, workflow_id, next_seq, next_visible_at)
SELECT 'a', 'tick', 't' || n, 50000 + n, clock_timestamp() + interval '1 day' FROM generate_series(1, 2500) AS n;
INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, visible_at)
SELECT 'a', 't' || n, 'tick', 't' || (n % 2500 + 1), '{}', clock_timestamp() + interval '1 day'
  FROM generate_series(1, 25000) AS n;
INSERT INTO keel_instances (app, workflow, workflow_id, state, state_version) VALUES ('a', 'tick', 'h', '{}', 10000);
INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, visible_at, status)
SELECT 'a', 'h' || n, 'tick', 'h', '{}', clock_timestamp(), CASE WHEN n <= 10000 THEN 'done' ELSE 'pending' END
  FROM generate_series(1, 35000) AS n;
INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
                        started_at, duration_s, outcome)
SELECT 'a', 'tick', CASE WHEN n <= 10000 THEN 'h' ELSE 't' || (n % 2500 + 1) END, 'h' || n, 'w', 1, n, n,
       clock_timestamp(), 0, 'committed'
  FROM generate_series(1, 50000) AS n;
INSERT INTO keel_state_history (app, workflow, workflow_id, version, state, written_at, writer)
SELECT 'a', 'tick', 't' || (n / 10 + 1), n % 10, '{}', clock_timestamp(), 'w' FROM generate_series(0, 24999) AS n;
INSERT INTO keel_instance_tombstones (app, workflow, workflow_id, fencing_token)
SELECT 'a', 'tick', 'd' || n, n FROM generate_series(1, 10000) AS n;
INSERT INTO keel_steps (app, message_id, name, result, worker, fencing_token, duration_s)
SELECT 'a', 'h' || n, 's', '{}', 'w', 1, 0 FROM generate_series(1, 10000) AS n;
ANALYZE;
"""

#: Every parameter any of the statements below takes, for instance h of workflow tick.
PARAMS: dict[str, Any] = {
    "app": "a",
    "workflow": "tick",
    "workflow_id": "h",
    "workflows": ["tick"],
    "apps": ["a"],
    "workflow_ids": ["h"],
    "kinds": ["workflow"],
    "limit": 32,
    "worker": "w",
    "lease_s": 30.0,
    "state": "{}",
    "fencing_token": 1,
    "version_read": 10000,
    "message_id": "h10001",
    "history_limit": 10,
    "attempt": 1,
    "started_at": "2026-01-01T00:00:00Z",
    "duration_s": 0.0,
    "outcome": "committed",
    "payload": "{}",
    "idempotency_key": None,
    "delay_s": 0.0,
    "channel": "c",
    "end_channel": "e",
}


@pytest.fixture(scope="module")
def conn() -> Iterator[psycopg.Connection[Any]]:
    """A connection to a schema holding about 100,000 rows of the runtime's tables, analyzed; one for the module."""
    import asyncio
    import uuid

    from tests.conftest import PG_DSN, require_postgres

    require_postgres()
    schema = f"keel_test_{uuid.uuid4().hex[:12]}"
    url = f"{PG_DSN}?options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:

        async def create() -> None:
            async with opened_backend(url):
                pass

        asyncio.run(create())
        with psycopg.connect(url, autocommit=True) as opened:
            opened.execute(FILL)
            yield opened
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def plan(conn: psycopg.Connection[Any], name: str) -> str:
    """The plan of one statement of ``broker.sql``; never run (a claim's lease runs after its lock, rolled back)."""
    with conn.transaction(force_rollback=True):
        if name == "lease":
            conn.execute(BROKER_QUERIES["lock_ready"], PARAMS)  # sets keel.claimed, which lease reads
        rows = conn.execute("EXPLAIN " + BROKER_QUERIES[name], PARAMS).fetchall()
    return "\n".join(str(row[0]) for row in rows)


#: The statements of a send, a claim, a commit and the client's reads, with the indexes each must use.
EXPECTED = {
    "lock_inboxes": ["keel_instances_pkey"],
    "append": ["keel_instance_tombstones_pkey", "keel_instances_pkey"],
    "lock_ready": ["keel_instances_ready_by_workflow"],
    "lease": ["keel_instances_pkey", "keel_messages_seq_key", "keel_steps_pkey"],
    "lock_instance": ["keel_instances_pkey"],
    "commit_turn": ["keel_instances_pkey", "keel_messages_inbox", "keel_state_history_pkey", "keel_messages_pkey"],
    "message": ["keel_messages_pkey"],
    "state": ["keel_instances_pkey"],
    "turns": ["keel_turns_instance"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_statements_of_a_turn_use_their_indexes_and_never_scan_a_table(
    conn: psycopg.Connection[Any], name: str
) -> None:
    text = plan(conn, name)
    assert "Seq Scan" not in text, text
    assert [index for index in EXPECTED[name] if not re.search(rf"\b{index}\b", text)] == [], text


def test_a_claim_bounds_its_index_scan_by_the_workflow_it_asks_for(conn: psycopg.Connection[Any]) -> None:
    # The ready instances of other workflows (50,000 parked ones here) are never stepped over: the workflow is part
    # of the index condition, not a filter applied to every ready row of the app.
    text = plan(conn, "lock_ready")
    [condition] = [line for line in text.splitlines() if "Index Cond" in line]
    assert "workflow = " in condition, text
    assert "workflow" not in "".join(line for line in text.splitlines() if "Filter" in line), text


@pytest.mark.parametrize("name", ["lease", "lock_instance", "commit_turn", "state", "append"])
def test_an_instance_is_found_by_its_whole_key(conn: psycopg.Connection[Any], name: str) -> None:
    # An index scan on the primary key bounded by the app alone (or the app and workflow) walks every instance of it:
    # the lease once hash-joined the instances it locked with all of the app's, at every claim.
    lines = plan(conn, name).splitlines()
    scans = [n for n, line in enumerate(lines) if "keel_instances_pkey on keel_instances" in line]
    assert scans, lines
    for n in scans:
        condition = next(line for line in lines[n + 1 :] if "Index Cond" in line)
        assert "workflow_id = " in condition, "\n".join(lines)

"""The plans of the statements every turn runs: each reaches its rows through an index bounded by all it knows.

SQLite plans without statistics (keel never runs ANALYZE), so a plan is the same at ten rows as at a million: what
would make a turn's cost grow with the history or the backlog is a statement that scans a table, sorts in a
temporary B-tree, or searches an index on fewer columns than it has (so it steps over rows it does not want).
``bench/growth.py`` measures the curves; these tests pin the plans that keep them flat.
"""

from __future__ import annotations

import re
import sqlite3
from typing import TYPE_CHECKING

import pytest

from keel.backends.sqlite.transactions import QUERIES
from tests.backends.sqlite._support import open_sqlite

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
async def conn(tmp_path: Path) -> sqlite3.Connection:
    """A connection to a file that keel's current schema was created in."""
    url = f"sqlite:///{tmp_path / 'plans.db'}"
    await (await open_sqlite(url)).aclose()
    return sqlite3.connect(tmp_path / "plans.db")


def plan(conn: sqlite3.Connection, name: str) -> list[str]:
    """The ``EXPLAIN QUERY PLAN`` lines of one statement of ``runtime.sql``, every parameter bound to 0."""
    query = QUERIES[name]
    params = dict.fromkeys(re.findall(r":(\w+)", query), 0)
    return [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + query, params)]


#: What a claim and a commit run (and resolving a dead letter), and how each must reach its rows.
EXPECTED = {
    # claim: the ready instances of one asked workflow, then the lease, the message's attempt and its steps
    "ready_instances": [
        "SEARCH keel_instances USING INDEX keel_instances_ready_by_workflow "
        "(app=? AND workflow=? AND next_visible_us<?)"
    ],
    "lease_instance": ["SEARCH keel_instances USING PRIMARY KEY (app=? AND workflow=? AND workflow_id=?)"],
    "start_attempt": ["SEARCH keel_messages USING INTEGER PRIMARY KEY (rowid=?)"],
    "message_steps": ["SEARCH keel_steps USING PRIMARY KEY (app=? AND message_id=?)"],
    # commit: the fence, the message done, the state written with the inbox moved on, the history trimmed
    "lease_of": ["SEARCH keel_instances USING PRIMARY KEY (app=? AND workflow=? AND workflow_id=?)"],
    "complete_message": ["SEARCH keel_messages USING INDEX sqlite_autoindex_keel_messages_1 (app=? AND message_id=?)"],
    "write_state": [
        "SEARCH keel_instances USING PRIMARY KEY (app=? AND workflow=? AND workflow_id=?)",
        "SCALAR SUBQUERY 1",
        "SEARCH keel_messages USING INDEX keel_messages_pending (app=? AND workflow=? AND workflow_id=?)",
    ],
    "trim_state_history": [
        "SEARCH keel_state_history USING PRIMARY KEY (app=? AND workflow=? AND workflow_id=? AND version<?)"
    ],
    # retrying or skipping a dead letter: the instance's failed message, not a walk over the app's messages
    "dead_letter_of": [
        "SEARCH i USING PRIMARY KEY (app=? AND workflow=? AND workflow_id=?)",
        "SEARCH m USING INDEX keel_messages_failed_by_instance (app=? AND workflow=? AND workflow_id=?)",
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_claim_and_commit_statements_search_an_index_on_all_they_know(conn: sqlite3.Connection, name: str) -> None:
    assert plan(conn, name) == EXPECTED[name]


#: The other statements of a send, a claim, a commit and the client's reads; inserts have no plan lines.
OTHERS = ("insert_message", "enqueue", "latest_seq", "work_signals", "append_state_history", "record_turn")
READS = ("message_info", "instance_state", "turns")


@pytest.mark.parametrize("name", OTHERS + READS)
def test_the_other_statements_of_a_turn_never_scan_or_sort(conn: sqlite3.Connection, name: str) -> None:
    lines = plan(conn, name)
    assert not [line for line in lines if line.startswith("SCAN ") and line != "SCAN CONSTANT ROW"], lines
    assert not [line for line in lines if "TEMP B-TREE" in line], lines

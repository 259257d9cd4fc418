"""SQLite-only behaviour of instance kinds: the version 5 -> 6 upgrade, which stores each instance's kind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import InstanceKind, InstanceRef, NewMessage, StoreOptions
from keel.backends.sqlite.migrate import SCHEMA_VERSION
from tests._engine import APP, claim_one, ref, send
from tests.backends.sqlite._support import sql, write_version_file

if TYPE_CHECKING:
    from pathlib import Path

#: A version 5 file's data: workflow instance loan/a and the delivery on/mail/e1 (handler mail, event e1), each with
#: one done message long finished and its turn record, under fencing token 3 and 1.
V5_DATA = """
INSERT INTO keel_schema VALUES ('store', 5);
INSERT INTO keel_messages (seq, app, message_id, workflow, workflow_id, payload, idempotency_key, status, attempts,
    state_version, sent_at, completed_at, sent_us, visible_us, finished_us) VALUES
    (1, 'loans', 'm1', 'loan', 'a', '{}', NULL, 'done', 1, 1, '2025-01-01T00:00:00+00:00',
        '2025-01-01T00:00:01+00:00', 1735689600000000, 1735689600000000, 1735689601000000),
    (2, 'loans', 'e1-mail', 'on/mail', 'e1', '{}', NULL, 'done', 1, 0, '2025-01-01T00:00:00+00:00',
        '2025-01-01T00:00:01+00:00', 1735689600000000, 1735689600000000, 1735689601000000);
INSERT INTO keel_instances (app, workflow, workflow_id, fencing_token, state, state_version, state_written_at,
    state_writer) VALUES
    ('loans', 'loan', 'a', 3, '{}', 1, '2025-01-01T00:00:01+00:00', 'old-worker'),
    ('loans', 'on/mail', 'e1', 1, NULL, 0, NULL, NULL);
INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
    version_written, started_at, started_us, duration_s, outcome, error) VALUES
    ('loans', 'loan', 'a', 'm1', 'old-worker', 1, 3, 0, 1, '2025-01-01T00:00:00.5+00:00', 1735689600500000, 0.5,
        'committed', NULL),
    ('loans', 'on/mail', 'e1', 'e1-mail', 'old-worker', 1, 1, 0, 0, '2025-01-01T00:00:00.5+00:00', 1735689600500000,
        0.5, 'committed', NULL);
"""


async def test_a_version_5_file_is_upgraded_with_each_instances_kind_and_pruned_by_it(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    write_version_file(path, 5, V5_DATA)
    url = f"sqlite:///{path}"
    backend = await open_backend(url, StoreOptions())
    try:
        assert sql(url, "SELECT component, version FROM keel_schema") == [("store", SCHEMA_VERSION)]
        kinds = sql(url, "SELECT workflow, workflow_id, kind FROM keel_instances ORDER BY workflow")
        assert kinds == [("loan", "a", "workflow"), ("on/mail", "e1", "delivery")]

        soon = datetime.now(UTC) + timedelta(seconds=5)
        pruned = await backend.prune(APP, finished_before=soon, keys_before=soon)
        # The delivery's turn record goes with its instance, uncounted; the workflow's is pruned as old.
        assert (pruned.messages, pruned.turns) == (2, 1)
        # The delivery went whole, row and all; the workflow instance keeps its row, token and state.
        rows = sql(url, "SELECT workflow, workflow_id, fencing_token, state_version, kind FROM keel_instances")
        assert rows == [("loan", "a", 3, 1, "workflow")]
        await send(backend, ref("a"))
        claim = await claim_one(backend)
        assert (claim.instance, claim.fencing_token, claim.state_version) == (ref("a"), 4, 1)
        # A new delivery is stored as one by the kind its message carries.
        await backend.send(NewMessage(InstanceRef(APP, "on/mail", "e2"), "e2-mail", "{}", kind=InstanceKind.delivery))
        assert sql(url, "SELECT kind FROM keel_instances WHERE workflow_id = 'e2'") == [("delivery",)]
    finally:
        await backend.aclose()


async def test_a_failed_upgrade_from_version_5_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    # The backfill, after the column was added, runs into this trigger: the whole step must roll back.
    blocker = "CREATE TRIGGER keel_block BEFORE UPDATE ON keel_instances BEGIN SELECT RAISE(ABORT, 'keel_block'); END;"
    write_version_file(path, 5, V5_DATA + blocker)
    url = f"sqlite:///{path}"
    with pytest.raises(keel.BackendUnavailable, match="keel_block"):
        await open_backend(url, StoreOptions())
    assert sql(url, "SELECT version FROM keel_schema") == [(5,)]
    assert "kind" not in {str(row[1]) for row in sql(url, "PRAGMA table_info(keel_instances)")}
    assert sql(url, "SELECT count(*) FROM keel_instances") == [(2,)]

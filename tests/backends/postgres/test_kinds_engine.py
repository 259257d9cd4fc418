"""PostgreSQL-only behaviour of instance kinds: the schema version 5 -> 6 upgrade, which stores each instance's kind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
import pytest

from keel.backends.base import InstanceKind, InstanceRef, NewMessage, TurnCommit
from keel.backends.postgres import migrate as pg_store
from tests._engine import APP, ref
from tests.backends.postgres._support import db_rows, opened_backend

if TYPE_CHECKING:
    from keel.backends.base import Claim

pytestmark = pytest.mark.postgres


def delivery(event_id: str) -> InstanceRef:
    return InstanceRef(APP, "on/mail", event_id)


def _ack(claim: Claim) -> TurnCommit:
    return TurnCommit(claim, None, "w1", datetime.now(UTC), 0.01)


async def _write_schema_version_5(url: str) -> None:
    """Workflow instance loan/42 and delivery on/mail/e1, each with one done message, as schema version 5 kept them.

    Written by this keel, then taken back to version 5: without ``keel_instances.kind`` (version 6),
    ``keel_messages.waited`` and the index of version 7.
    """
    async with opened_backend(url) as backend:
        await backend.send(NewMessage(ref(), "m1", "{}"))
        await backend.send(NewMessage(delivery("e1"), "e1-mail", "{}", kind=InstanceKind.delivery))
        for workflow in ("loan", "on/mail"):
            [claim] = await backend.claim(APP, [workflow], worker="w1", lease_s=5, limit=1)
            await backend.commit_turn(_ack(claim))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE keel_instances DROP COLUMN kind")
        conn.execute("ALTER TABLE keel_messages DROP COLUMN waited")
        conn.execute("DROP INDEX keel_instances_ready_by_workflow")
        conn.execute(pg_store.QUERIES["record_schema_version"], {"component": "store", "version": 5})


async def test_a_database_at_schema_version_5_is_upgraded_with_each_instances_kind(postgres_url: str) -> None:
    await _write_schema_version_5(postgres_url)
    assert db_rows(postgres_url, "SELECT version FROM keel_schema") == [(5,)]
    async with opened_backend(postgres_url) as backend:
        assert db_rows(postgres_url, "SELECT component, version FROM keel_schema") == [
            ("store", pg_store.SCHEMA_VERSION)
        ]
        kinds = db_rows(postgres_url, "SELECT workflow, workflow_id, kind FROM keel_instances ORDER BY workflow")
        assert kinds == [("loan", "42", "workflow"), ("on/mail", "e1", "delivery")]

        soon = datetime.now(UTC) + timedelta(seconds=5)
        pruned = await backend.prune(APP, finished_before=soon, keys_before=soon)
        assert pruned.messages == 2
        # The delivery went whole, row and all; the workflow instance keeps its row and fencing token.
        rows = db_rows(postgres_url, "SELECT workflow, workflow_id, fencing_token, kind FROM keel_instances")
        assert rows == [("loan", "42", 1, "workflow")]
        await backend.send(NewMessage(ref(), "m2", "{}"))
        [claim] = await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=1)
        assert (claim.message_id, claim.fencing_token) == ("m2", 2)

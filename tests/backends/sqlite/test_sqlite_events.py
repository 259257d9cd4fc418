"""SQLite-only behaviour of events: the version 4 -> 5 upgrade, how events are stored, rolled back and pruned."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import InstanceKind, InstanceRef, NewEvent, NewMessage, Pruned, StoreOptions, TurnCommit
from keel.backends.sqlite import broker
from keel.backends.sqlite.migrate import SCHEMA_VERSION
from tests.backends.sqlite._support import (
    APP,
    claim_one,
    commit_of,
    ref,
    send,
    sql,
    step_of,
    write_version_file,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from keel.backends.base import Backend, Claim
    from keel.backends.sqlite.backend import SqliteBackend

T = TypeVar("T")

#: A version 4 file's data: instance a with m1 done and m2 pending, and a turn record of m1.
V4_DATA = """
INSERT INTO keel_schema VALUES ('store', 4);
INSERT INTO keel_messages (seq, app, message_id, workflow, workflow_id, payload, idempotency_key, status, attempts,
    state_version, sent_at, completed_at, sent_us, visible_us, finished_us) VALUES
    (1, 'loans', 'm1', 'loan', 'a', '{"n": 1}', NULL, 'done', 1, 1, '2025-01-01T00:00:00+00:00',
        '2025-01-01T00:00:01+00:00', 1735689600000000, 1735689600000000, 1735689601000000),
    (2, 'loans', 'm2', 'loan', 'a', '{"n": 2}', NULL, 'pending', 0, NULL, '2025-01-01T00:00:02+00:00', NULL,
        1735689602000000, 1735689602000000, NULL);
INSERT INTO keel_instances (app, workflow, workflow_id, fencing_token, state, state_version, state_written_at,
    state_writer, next_seq, next_visible_us) VALUES
    ('loans', 'loan', 'a', 1, '{"n": 1}', 1, '2025-01-01T00:00:01+00:00', 'old-worker', 2, 1735689602000000);
INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
    version_written, started_at, started_us, duration_s, outcome, error) VALUES
    ('loans', 'loan', 'a', 'm1', 'old-worker', 1, 1, 0, 1, '2025-01-01T00:00:00.5+00:00', 1735689600500000, 0.5,
        'committed', NULL);
"""


def delivery(handler: str, event_id: str) -> InstanceRef:
    return InstanceRef(APP, f"on/{handler}", event_id)


def event_of(
    handlers: tuple[str, ...] = ("mail",), *, event_id: str = "e1", key: str | None = None, source: Claim | None = None
) -> NewEvent:
    deliveries = tuple(
        NewMessage(delivery(h, event_id), f"{event_id}-{h}", '{"to": "' + h + '"}', kind=InstanceKind.delivery)
        for h in handlers
    )
    return NewEvent(
        APP,
        event_id,
        "Approved",
        '{"loan": "42"}',
        handlers,
        deliveries,
        None if source is None else source.instance,
        None if source is None else source.message_id,
        key,
    )


def ack_of(claim: Claim) -> TurnCommit:
    """A handler delivery's acknowledgement: a commit without state."""
    return TurnCommit(claim, None, "w1", datetime.now(UTC), 0.01)


async def claim_delivery(backend: Backend, handler: str = "mail") -> Claim:
    [claim] = await backend.claim(APP, [f"on/{handler}"], worker="w1", lease_s=5, limit=1)
    return claim


# --- Upgrading a version 4 file -----------------------------------------------------------------------------


async def test_a_version_4_file_is_upgraded_with_an_empty_event_log(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    write_version_file(path, 4, V4_DATA)
    url = f"sqlite:///{path}"
    backend = await open_backend(url, StoreOptions())
    try:
        assert sql(url, "SELECT component, version FROM keel_schema") == [("store", SCHEMA_VERSION)]
        indexes = {name for (name,) in sql(url, "SELECT name FROM sqlite_master WHERE tbl_name = 'keel_events'")}
        assert {"keel_events_app", "keel_events_published", "keel_events_key"} <= indexes
        assert await backend.events(APP, limit=10) == []
        # The old inbox, state and turn records carry on; the old turn's commit emits the first event.
        claim = await claim_one(backend)
        assert (claim.instance, claim.message_id, claim.state_version, claim.fencing_token) == (ref("a"), "m2", 1, 2)
        await backend.commit_turn(replace(commit_of(claim, {"n": 2}), events=(event_of(source=claim),)))
        [row] = await backend.events(APP, limit=10)
        assert (row.seq, row.event_id, row.source, row.source_message_id) == (1, "e1", ref("a"), "m2")
        assert [t.message_id for t in await backend.turns(ref("a"), limit=5)] == ["m2", "m1"]
        assert (await claim_delivery(backend)).message_id == "e1-mail"
    finally:
        await backend.aclose()


async def test_a_failed_upgrade_from_version_4_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    write_version_file(path, 4, V4_DATA + "CREATE INDEX keel_events_key ON keel_messages (seq);")
    url = f"sqlite:///{path}"
    with pytest.raises(keel.BackendUnavailable, match="keel_events_key"):
        await open_backend(url, StoreOptions())
    assert sql(url, "SELECT version FROM keel_schema") == [(4,)]
    assert sql(url, "SELECT name FROM sqlite_master WHERE name = 'keel_events'") == []
    assert sql(url, "SELECT count(*) FROM keel_messages") == [(2,)]


# --- How events are stored ----------------------------------------------------------------------------------


async def test_an_event_is_one_row_with_its_handlers_as_json_and_its_source_in_columns(backend: SqliteBackend) -> None:
    await send(backend, ref())
    claim = await claim_one(backend)
    before_us = datetime.now(UTC).timestamp() * 1_000_000
    await backend.commit_turn(replace(commit_of(claim), events=(event_of(("mail", "audit"), source=claim),)))
    [(handlers, app, workflow, workflow_id, message_id, key, published_us)] = sql(
        backend.url,
        "SELECT handlers, source_app, source_workflow, source_workflow_id, source_message_id, idempotency_key, "
        "published_us FROM keel_events",
    )
    assert json.loads(str(handlers)) == ["mail", "audit"]
    assert (app, workflow, workflow_id, message_id, key) == (APP, "loan", "42", claim.message_id, None)
    assert isinstance(published_us, int) and published_us >= before_us - 1_000_000
    [row] = await backend.events(APP, limit=1)
    assert row.published_at == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=published_us)
    deliveries = sql(
        backend.url, "SELECT workflow, workflow_id, message_id FROM keel_messages WHERE seq > 1 ORDER BY seq"
    )
    assert deliveries == [("on/mail", "e1", "e1-mail"), ("on/audit", "e1", "e1-audit")]


async def test_a_commit_whose_delivery_cannot_be_written_writes_nothing(backend: SqliteBackend) -> None:
    await send(backend, ref())
    claim = await claim_one(backend)
    sql(
        backend.url,
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON keel_messages WHEN NEW.workflow = 'on/audit' "
        "BEGIN SELECT RAISE(ABORT, 'no audit today'); END",
    )
    commit = TurnCommit(
        claim,
        '{"n": 1}',
        "w1",
        datetime.now(UTC),
        0.01,
        sends=(NewMessage(ref("b"), "to-b", "{}"),),
        events=(event_of(("mail", "audit")),),
    )
    with pytest.raises(sqlite3.IntegrityError, match="no audit today"):
        await backend.commit_turn(commit)
    for table in ("keel_events", "keel_turns", "keel_state_history"):
        assert sql(backend.url, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert sql(backend.url, "SELECT message_id, status FROM keel_messages") == [(claim.message_id, "pending")]
    assert await backend.state(ref()) is None
    sql(backend.url, "DROP TRIGGER refuse_audit")
    assert await backend.commit_turn(commit) == 1  # the lease was never released: the same commit goes through


async def test_an_acknowledgement_writes_no_state_and_moves_the_delivery_inbox_on(backend: SqliteBackend) -> None:
    await backend.publish(event_of())
    claim = await claim_delivery(backend)
    assert await backend.commit_turn(ack_of(claim)) == 0
    assert sql(backend.url, "SELECT count(*) FROM keel_state_history") == [(0,)]
    assert sql(
        backend.url, "SELECT state, state_version, lease_owner, lease_expires_us, next_seq FROM keel_instances"
    ) == [(None, 0, None, None, None)]
    with pytest.raises(keel.LeaseLostError, match="released"):
        await backend.commit_turn(ack_of(claim))


# --- Pruning ------------------------------------------------------------------------------------------------


async def test_prune_deletes_a_finished_delivery_whole_and_leaves_no_tombstone(backend: SqliteBackend) -> None:
    await backend.publish(event_of(("mail", "audit")))
    done = await claim_delivery(backend, "mail")
    await backend.record_step(step_of(done, "smtp"))
    await backend.commit_turn(ack_of(done))
    await claim_delivery(backend, "audit")  # still running: kept
    await send(backend, ref())
    await backend.commit_turn(commit_of(await claim_one(backend)))
    soon = datetime.now(UTC) + timedelta(seconds=5)
    assert await backend.prune(APP, finished_before=soon, keys_before=soon) == Pruned(messages=2, turns=1, events=1)
    assert sql(backend.url, "SELECT workflow, workflow_id, deleted FROM keel_instances ORDER BY 1") == [
        ("loan", "42", 0),
        ("on/audit", "e1", 0),
    ]
    assert sql(backend.url, "SELECT workflow FROM keel_messages") == [("on/audit",)]
    for table in ("keel_steps", "keel_turns", "keel_events"):
        assert sql(backend.url, f"SELECT count(*) FROM {table}") == [(0,)], table


async def test_prune_deletes_events_in_batches(backend: SqliteBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker, "PRUNE_BATCH", 2)
    for n in range(5):
        await backend.publish(event_of((), event_id=f"e{n}", key=f"k{n}"))
    writes = 0
    real = backend.database.write

    async def counted(fn: Callable[[sqlite3.Connection], T], **options: Any) -> T:
        nonlocal writes
        writes += 1
        return await real(fn, **options)

    monkeypatch.setattr(backend.database, "write", counted)
    soon = datetime.now(UTC) + timedelta(seconds=5)
    assert await backend.prune(APP, finished_before=soon, keys_before=soon) == Pruned(events=5)
    assert writes == 3  # 2 + 2 + 1
    assert await backend.publish(event_of((), event_id="again", key="k0")) == "again"  # its key went with it

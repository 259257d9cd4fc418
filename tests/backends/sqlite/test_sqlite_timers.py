"""SQLite-only behaviour of durable timers, pruning and deleting: the version 3 -> 4 upgrade and how they are stored."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import Pruned, StoreOptions
from keel.backends.sqlite import broker, wake
from keel.backends.sqlite.migrate import SCHEMA_VERSION
from tests._engine import APP, claim_one, commit_of, opened, ref, send, step_of, timed_wait
from tests.backends.sqlite._support import sql, write_version_file

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from keel.backends.sqlite.backend import SqliteBackend

T = TypeVar("T")

#: A version 3 file's data. Instance a: m1 done (with a step), m2 pending. Instance b: m3 skipped, m4 failed
#: (pausing b), m5 waiting behind it. Instance c: m6 pending, sent before m2 though its seq is higher (sent_at
#: texts with and without microseconds, as Python writes them). Two turn records of a.
V3_DATA = """
INSERT INTO keel_schema VALUES ('store', 3);
INSERT INTO keel_messages (seq, app, message_id, workflow, workflow_id, payload, idempotency_key, status, attempts,
    state_version, error, sent_at, completed_at, failed_us) VALUES
    (1, 'loans', 'm1', 'loan', 'a', '{"n": 1}', 'k1', 'done', 1, 1, NULL,
        '2025-01-01T00:00:00.250000+00:00', '2025-01-01T00:00:01.500000+00:00', NULL),
    (2, 'loans', 'm2', 'loan', 'a', '{"n": 2}', NULL, 'pending', 0, NULL, NULL, '2025-01-01T00:00:02+00:00', NULL,
        NULL),
    (3, 'loans', 'm3', 'loan', 'b', '{"n": 3}', NULL, 'skipped', 1, NULL, 'boom', '2025-01-01T00:00:03+00:00',
        '2025-01-02T00:00:00+00:00', NULL),
    (4, 'loans', 'm4', 'loan', 'b', '{"n": 4}', NULL, 'failed', 2, NULL, 'bang', '2025-01-01T00:00:04+00:00',
        '2025-01-01T00:00:05+00:00', 1735689605000000),
    (5, 'loans', 'm5', 'loan', 'b', '{"n": 5}', NULL, 'pending', 0, NULL, NULL, '2025-01-01T00:00:05+00:00', NULL,
        NULL),
    (6, 'loans', 'm6', 'loan', 'c', '{"n": 6}', NULL, 'pending', 0, NULL, NULL,
        '2025-01-01T00:00:00.000001+00:00', NULL, NULL);
INSERT INTO keel_instances (app, workflow, workflow_id, fencing_token, paused, state, state_version,
    state_written_at, state_writer, next_seq) VALUES
    ('loans', 'loan', 'a', 1, 0, '{"n": 1}', 1, '2025-01-01T00:00:01.500000+00:00', 'old-worker', 2),
    ('loans', 'loan', 'b', 2, 1, NULL, 0, NULL, NULL, 5),
    ('loans', 'loan', 'c', 0, 0, NULL, 0, NULL, NULL, 6);
INSERT INTO keel_steps VALUES ('loans', 'm1', 'charge', '"ch_1"', 'old-worker', 0.1, '2025-01-01T00:00:01+00:00');
INSERT INTO keel_state_history VALUES ('loans', 'loan', 'a', 1, '{"n": 1}', '2025-01-01T00:00:01.5+00:00', 'w');
INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read,
    version_written, started_at, duration_s, outcome, error) VALUES
    ('loans', 'loan', 'a', 'm1', 'old-worker', 1, 1, 0, 1, '2025-01-01T00:00:01+00:00', 0.5, 'committed', NULL),
    ('loans', 'loan', 'b', 'm4', 'old-worker', 2, 2, 0, NULL, '2025-01-03T00:00:00.000042+00:00', 0.1, 'failed',
        'bang');
"""


def us(text: str) -> int:
    """Microseconds since the epoch of an ISO time."""
    return (datetime.fromisoformat(text) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


# --- Upgrading a version 3 file -----------------------------------------------------------------------------


async def test_a_version_3_file_is_upgraded_with_messages_visible_from_when_they_were_sent(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    write_version_file(path, 3, V3_DATA)
    url = f"sqlite:///{path}"
    backend = await open_backend(url, StoreOptions())
    try:
        assert sql(url, "SELECT component, version FROM keel_schema") == [("store", SCHEMA_VERSION)]
        assert sql(url, "SELECT message_id, sent_us, visible_us, finished_us FROM keel_messages ORDER BY seq") == [
            (
                "m1",
                us("2025-01-01T00:00:00.25+00:00"),
                us("2025-01-01T00:00:00.25+00:00"),
                us("2025-01-01T00:00:01.5+00:00"),
            ),
            ("m2", us("2025-01-01T00:00:02+00:00"), us("2025-01-01T00:00:02+00:00"), None),
            ("m3", us("2025-01-01T00:00:03+00:00"), us("2025-01-01T00:00:03+00:00"), us("2025-01-02T00:00:00+00:00")),
            ("m4", us("2025-01-01T00:00:04+00:00"), us("2025-01-01T00:00:04+00:00"), None),  # failed: never pruned
            ("m5", us("2025-01-01T00:00:05+00:00"), us("2025-01-01T00:00:05+00:00"), None),
            ("m6", us("2025-01-01T00:00:00.000001+00:00"), us("2025-01-01T00:00:00.000001+00:00"), None),
        ]
        assert sql(url, "SELECT started_us FROM keel_turns ORDER BY id") == [
            (us("2025-01-01T00:00:01+00:00"),),
            (us("2025-01-03T00:00:00.000042+00:00"),),
        ]
        assert sql(url, "SELECT workflow_id, next_seq, next_visible_us, deleted FROM keel_instances ORDER BY 1") == [
            ("a", 2, us("2025-01-01T00:00:02+00:00"), 0),
            ("b", 5, us("2025-01-01T00:00:05+00:00"), 0),
            ("c", 6, us("2025-01-01T00:00:00.000001+00:00"), 0),
        ]
        indexes = {name for (name,) in sql(url, "SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"keel_messages_pending", "keel_messages_finished", "keel_turns_started", "keel_instances_ready"} <= (
            indexes
        )
        # Claims go by when messages were sent: c's m6 first, though a's m2 has the lower seq; b stays paused.
        claims = await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=5)
        assert [(c.instance, c.message_id, c.fencing_token, c.state_version) for c in claims] == [
            (ref("c"), "m6", 1, 0),
            (ref("a"), "m2", 2, 1),
        ]
        # Old finished records prune like new ones: m1 and its step (its key is past keys_before), a's turn.
        cut = datetime(2025, 1, 1, 12, tzinfo=UTC)
        assert await backend.prune(APP, finished_before=cut, keys_before=cut) == Pruned(messages=1, turns=1)
        assert sql(url, "SELECT count(*) FROM keel_steps") == [(0,)]
        assert await backend.message(APP, "m3") is not None
        # Old dead letters still resolve, and old instances delete.
        assert await backend.resolve_dead_letter(ref("b"), skip=False) == "m4"
        assert await backend.delete_instance(ref("b")) is True
        assert sql(url, "SELECT message_id FROM keel_messages WHERE workflow_id = 'b'") == []
    finally:
        await backend.aclose()


async def test_a_failed_upgrade_from_version_3_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    write_version_file(path, 3, V3_DATA + "CREATE INDEX keel_turns_started ON keel_turns (id);")
    url = f"sqlite:///{path}"
    with pytest.raises(keel.BackendUnavailable, match="keel_turns_started"):
        await open_backend(url, StoreOptions())
    assert sql(url, "SELECT version FROM keel_schema") == [(3,)]
    columns = {str(row[1]) for row in sql(url, "PRAGMA table_info(keel_messages)")}
    assert "visible_us" not in columns and "sent_us" not in columns
    assert sql(url, "SELECT name FROM sqlite_master WHERE name = 'keel_messages_finished'") == []
    assert sql(url, "SELECT count(*) FROM keel_messages") == [(6,)]


#: Writes as keel code of schema version 3 makes them: a send, a turn record, and a resolved dead letter's inbox move.
V3_WRITES = (
    "INSERT INTO keel_messages (app, message_id, workflow, workflow_id, payload, idempotency_key, sent_at) "
    "VALUES ('loans', 'old', 'loan', 'a', '{}', NULL, '2025-02-01T00:00:00+00:00')",
    "INSERT INTO keel_turns (app, workflow, workflow_id, message_id, worker, attempt, fencing_token, version_read, "
    "version_written, started_at, duration_s, outcome, error) "
    "VALUES ('loans', 'loan', 'a', 'm2', 'old', 1, 2, 1, 2, '2025-02-01T00:00:00+00:00', 0.1, 'committed', NULL)",
    "UPDATE keel_instances SET paused = 0, next_seq = (SELECT min(seq) FROM keel_messages "
    "WHERE app = 'loans' AND workflow = 'loan' AND workflow_id = 'b' AND status = 'failed') "
    "WHERE app = 'loans' AND workflow = 'loan' AND workflow_id = 'b'",
)


@pytest.mark.parametrize("write", V3_WRITES)
async def test_a_process_still_running_version_3_code_is_refused_its_writes(tmp_path: Path, write: str) -> None:
    path = tmp_path / "v3.db"
    write_version_file(path, 3, V3_DATA)
    url = f"sqlite:///{path}"
    await (await open_backend(url, StoreOptions())).aclose()
    sql(url, "UPDATE keel_instances SET next_seq = NULL, next_visible_us = NULL")  # as after this code's writes
    with pytest.raises(sqlite3.IntegrityError, match="upgrade keel-runtime in this process"):
        sql(url, write)


# --- Durable timers -----------------------------------------------------------------------------------------


async def test_a_delayed_message_is_stored_with_its_visible_time_and_moves_the_inbox_only_if_sooner(
    backend: SqliteBackend,
) -> None:
    before_us = time.time_ns() // 1000
    await send(backend, ref(), delay_s=30)
    await send(backend, ref(), delay_s=60)
    [(seq, visible_us)] = sql(backend.url, "SELECT next_seq, next_visible_us FROM keel_instances")
    assert seq == 1 and isinstance(visible_us, int)
    assert before_us + 30_000_000 <= visible_us <= before_us + 31_000_000
    await send(backend, ref())  # visible now: it becomes the next message
    [(seq, now_visible_us)] = sql(backend.url, "SELECT next_seq, next_visible_us FROM keel_instances")
    assert seq == 3 and isinstance(now_visible_us, int) and now_visible_us < visible_us
    claim = await claim_one(backend)
    await backend.commit_turn(commit_of(claim))
    assert sql(backend.url, "SELECT next_seq, next_visible_us FROM keel_instances") == [(1, visible_us)]
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=5) == []


async def test_a_delayed_message_coming_due_wakes_an_idle_waiter(sqlite_url: str) -> None:
    async with opened(sqlite_url) as worker, opened(sqlite_url) as sender:
        await send(sender, ref(), delay_s=0.4)
        assert await worker.claim(APP, ["loan"], worker="w1", lease_s=5, limit=5) == []
        waited = await timed_wait(worker, 10)
        assert 0.3 <= waited < 0.4 + 5 * broker.POLL_INTERVAL_S + 0.2
        assert len(await worker.claim(APP, ["loan"], worker="w1", lease_s=5, limit=5)) == 1


async def test_work_not_visible_yet_does_not_make_a_waiter_spin(
    backend: SqliteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = 0
    real = wake.SqliteWake._work_signals

    async def counted(self: wake.SqliteWake, app: str, since_us: int) -> tuple[int, int | None]:
        nonlocal polls
        polls += 1
        return await real(self, app, since_us)

    monkeypatch.setattr(wake.SqliteWake, "_work_signals", counted)
    await send(backend, ref("a"), delay_s=60)
    await send(backend, ref("b"))
    await claim_one(backend)  # b's message; a's is not visible, and b's lease now holds its next ones
    await send(backend, ref("b"))
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=5) == []
    assert await timed_wait(backend, 0.4) >= 0.35
    assert polls <= 0.4 / broker.POLL_INTERVAL_S + 2  # polled at its interval, no faster


# --- Pruning ------------------------------------------------------------------------------------------------


async def test_prune_works_in_batches_until_nothing_is_left(
    backend: SqliteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker, "PRUNE_BATCH", 2)
    for n in range(5):
        await send(backend, ref(str(n)), key=f"k{n}")
        claim = await claim_one(backend)
        await backend.record_step(step_of(claim, "charge"))
        await backend.commit_turn(commit_of(claim, {"n": n}))
    writes = 0
    real = backend.database.write

    async def counted(fn: Callable[[sqlite3.Connection], T], **options: Any) -> T:
        nonlocal writes
        writes += 1
        return await real(fn, **options)

    monkeypatch.setattr(backend.database, "write", counted)
    soon = datetime.now(UTC) + timedelta(seconds=5)
    assert await backend.prune(APP, finished_before=soon, keys_before=soon) == Pruned(messages=5, turns=5)
    assert writes == 3  # 2 + 2 + 1
    assert sql(backend.url, "SELECT count(*) FROM keel_messages") == [(0,)]
    assert sql(backend.url, "SELECT count(*) FROM keel_steps") == [(0,)]
    assert sql(backend.url, "SELECT count(*) FROM keel_turns") == [(0,)]
    assert sql(backend.url, "SELECT count(*) FROM keel_state_history") == [(5,)]  # states are never pruned


async def test_prune_keeps_the_steps_of_messages_it_keeps(backend: SqliteBackend) -> None:
    await send(backend, ref("a"))
    done = await claim_one(backend)
    await backend.record_step(step_of(done, "charge"))
    await backend.commit_turn(commit_of(done))
    await send(backend, ref("b"))
    held = await claim_one(backend)
    await backend.record_step(step_of(held, "charge"))
    soon = datetime.now(UTC) + timedelta(seconds=5)
    assert await backend.prune(APP, finished_before=soon, keys_before=soon) == Pruned(messages=1, turns=1)
    assert sql(backend.url, "SELECT message_id FROM keel_steps") == [(held.message_id,)]
    assert await backend.prune("other-app", finished_before=soon, keys_before=soon) == Pruned()


# --- Deleting instances -------------------------------------------------------------------------------------


async def test_a_deleted_instance_leaves_a_tombstone_row_that_keeps_its_token(backend: SqliteBackend) -> None:
    """The rule (tokens never repeat, a stale claim writes nothing) is in tests/conformance/test_fencing.py."""
    await send(backend, ref())
    first = await claim_one(backend)
    await backend.record_step(step_of(first, "charge"))
    await backend.commit_turn(commit_of(first, {"n": 1}))
    await send(backend, ref(), delay_s=3600)
    await send(backend, ref())
    held = await claim_one(backend)
    assert await backend.delete_instance(ref()) is True
    for table in ("keel_messages", "keel_steps", "keel_turns", "keel_state_history"):
        assert sql(backend.url, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert sql(
        backend.url, "SELECT fencing_token, deleted, lease_owner, state, state_version, next_seq FROM keel_instances"
    ) == [(held.fencing_token, 1, None, None, 0, None)]
    with pytest.raises(keel.LeaseLostError, match="the instance was deleted"):
        await backend.commit_turn(commit_of(held))
    await send(backend, ref())
    fresh = await claim_one(backend)
    assert fresh.fencing_token == held.fencing_token + 1

"""SQLite-only behaviour of steps, retries and dead letters: the version 2 -> 3 upgrade and how holds are stored."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import MessageStatus, NewMessage, StoreOptions
from keel.backends.sqlite.migrate import SCHEMA_VERSION
from tests._engine import APP, claim_one, commit_of, failure_of, ref, send, step_of
from tests.backends.sqlite._support import sql, write_version_file

if TYPE_CHECKING:
    from pathlib import Path

    from keel.backends.sqlite.backend import SqliteBackend

#: A version 2 file's data: instance a paused by failed message m2 (m3 waiting behind it), b with a pending
#: message, c paused by m5; the seq counter is ahead of the rows, as if newer messages had been deleted.
V2_DATA = """
INSERT INTO keel_schema VALUES ('store', 2);
INSERT INTO keel_messages (seq, app, message_id, workflow, workflow_id, payload, status, attempts, state_version,
    error, sent_at, completed_at) VALUES
    (1, 'loans', 'm1', 'loan', 'a', '{"n": 1}', 'done', 1, 1, NULL,
        '2025-01-01T00:00:00+00:00', '2025-01-01T00:00:01+00:00'),
    (2, 'loans', 'm2', 'loan', 'a', '{"n": 2}', 'failed', 3, NULL, 'ValueError: boom',
        '2025-01-01T00:00:02+00:00', '2025-01-02T03:04:05.123456+00:00'),
    (3, 'loans', 'm3', 'loan', 'a', '{"n": 3}', 'pending', 0, NULL, NULL, '2025-01-01T00:00:03+00:00', NULL),
    (4, 'loans', 'm4', 'loan', 'b', '{"n": 4}', 'pending', 0, NULL, NULL, '2025-01-01T00:00:04+00:00', NULL),
    (5, 'loans', 'm5', 'loan', 'c', '{"n": 5}', 'failed', 1, NULL, 'KeyError: gone',
        '2025-01-01T00:00:05+00:00', '2025-01-03T00:00:00+00:00');
UPDATE sqlite_sequence SET seq = 9 WHERE name = 'keel_messages';
INSERT INTO keel_instances (app, workflow, workflow_id, fencing_token, paused, state, state_version,
    state_written_at, state_writer, next_seq) VALUES
    ('loans', 'loan', 'a', 4, 1, '{"n": 1}', 1, '2025-01-01T00:00:01+00:00', 'old-worker', 3),
    ('loans', 'loan', 'b', 0, 0, NULL, 0, NULL, NULL, 4),
    ('loans', 'loan', 'c', 1, 1, NULL, 0, NULL, NULL, NULL);
"""


# --- Upgrading a version 2 file -----------------------------------------------------------------------------


async def test_a_version_2_file_is_upgraded_in_place_keeping_its_inboxes_and_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    write_version_file(path, 2, V2_DATA)
    url = f"sqlite:///{path}"
    backend = await open_backend(url, StoreOptions())
    try:
        assert sql(url, "SELECT component, version FROM keel_schema") == [("store", SCHEMA_VERSION)]
        assert sql(url, "SELECT name FROM sqlite_master WHERE name LIKE '%_v3'") == []
        indexes = {name for (name,) in sql(url, "SELECT name FROM sqlite_master WHERE tbl_name = 'keel_messages'")}
        assert {"keel_messages_pending", "keel_messages_app", "keel_messages_failed"} <= indexes
        # Dead letters of version 2 keep their error and attempts; they failed when they completed, to the µs.
        dead = await backend.dead_letters(APP, limit=10)
        assert [(d.instance, d.message_id, d.error, d.attempts) for d in dead] == [
            (ref("c"), "m5", "KeyError: gone", 1),
            (ref("a"), "m2", "ValueError: boom", 3),
        ]
        assert [d.failed_at for d in dead] == [
            datetime(2025, 1, 3, tzinfo=UTC),
            datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        ]
        # The seq counter was carried over: a new message never reuses a seq handed out before.
        new_id = await send(backend, ref("d"))
        assert sql(url, f"SELECT seq FROM keel_messages WHERE message_id = '{new_id}'") == [(10,)]
        # Inboxes go on as they were: b first (oldest pending message), then d; paused a and c wait.
        claims = await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=5)
        assert [(c.instance, c.message_id, c.attempt, c.steps) for c in claims] == [
            (ref("b"), "m4", 1, {}),
            (ref("d"), new_id, 1, {}),
        ]
        # The old dead letters resolve like new ones: m2 retried before m3, m5 skipped (a status v2 refused).
        assert await backend.resolve_dead_letter(ref("a"), skip=False) == "m2"
        assert await backend.resolve_dead_letter(ref("c"), skip=True) == "m5"
        again = await claim_one(backend)
        assert (again.instance, again.message_id, again.attempt, again.state_version) == (ref("a"), "m2", 1, 1)
        await backend.record_step(step_of(again, "score", 0.5))
        await backend.commit_turn(commit_of(again, {"n": 2}))
        assert (await claim_one(backend)).message_id == "m3"
        info = await backend.message(APP, "m5")
        assert info is not None and info.status is MessageStatus.skipped
    finally:
        await backend.aclose()


async def test_a_failed_upgrade_from_version_2_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    write_version_file(path, 2, V2_DATA + "CREATE TABLE keel_steps (clash INTEGER);")
    url = f"sqlite:///{path}"
    with pytest.raises(keel.BackendUnavailable, match="keel_steps"):
        await open_backend(url, StoreOptions())
    assert sql(url, "SELECT version FROM keel_schema") == [(2,)]
    assert sql(url, "SELECT name FROM sqlite_master WHERE name = 'keel_messages_v3'") == []
    assert sql(url, "SELECT count(*) FROM keel_messages") == [(5,)]
    assert sql(url, "SELECT seq FROM sqlite_sequence WHERE name = 'keel_messages'") == [(9,)]
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # still the version 2 table
        sql(url, "UPDATE keel_messages SET status = 'skipped' WHERE message_id = 'm5'")


async def test_a_new_file_allows_every_message_status(backend: SqliteBackend) -> None:
    await send(backend, ref())
    for status in MessageStatus:
        sql(backend.url, f"UPDATE keel_messages SET status = '{status.value}'")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        sql(backend.url, "UPDATE keel_messages SET status = 'lost'")


# --- How steps, retries and dead letters are stored ---------------------------------------------------------


async def test_a_retry_releases_the_lease_but_holds_the_instance_until_the_delay_ends(backend: SqliteBackend) -> None:
    await send(backend, ref())
    claim = await claim_one(backend)
    before_us = time.time_ns() // 1000
    await backend.retry_turn(failure_of(claim), delay_s=30)
    [(owner, expires_us, next_seq)] = sql(
        backend.url, "SELECT lease_owner, lease_expires_us, next_seq FROM keel_instances"
    )
    assert owner is None and next_seq == 1
    assert isinstance(expires_us, int) and before_us + 30_000_000 <= expires_us <= before_us + 31_000_000
    assert sql(backend.url, "SELECT status, attempts FROM keel_messages") == [("pending", 1)]
    # The retried claim can neither renew, nor cut the hold short by releasing, nor record a step.
    assert await backend.renew([claim], lease_s=5) == [False]
    await backend.release(claim)
    assert sql(backend.url, "SELECT lease_expires_us FROM keel_instances") == [(expires_us,)]
    assert await backend.claim(APP, ["loan"], worker="w2", lease_s=5, limit=1) == []
    with pytest.raises(keel.LeaseLostError, match="released"):
        await backend.record_step(step_of(claim, "pay", 1))
    sql(backend.url, "UPDATE keel_instances SET lease_expires_us = 0")  # the delay is over
    assert (await claim_one(backend)).attempt == 2


async def test_a_refused_retry_or_step_writes_nothing(backend: SqliteBackend) -> None:
    await send(backend, ref())
    claim = await claim_one(backend)
    sql(backend.url, "UPDATE keel_instances SET lease_expires_us = 1")  # expired long ago
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.retry_turn(failure_of(claim), delay_s=30)
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.record_step(step_of(claim, "pay", 1))
    assert sql(backend.url, "SELECT count(*) FROM keel_turns") == [(0,)]
    assert sql(backend.url, "SELECT count(*) FROM keel_steps") == [(0,)]
    assert sql(backend.url, "SELECT lease_owner, lease_expires_us FROM keel_instances") == [("w1", 1)]


async def test_a_failure_records_when_it_happened_in_microseconds(backend: SqliteBackend) -> None:
    await send(backend, ref())
    before = datetime.now(UTC)
    await backend.fail_turn(failure_of(await claim_one(backend)))
    [dead] = await backend.dead_letters(APP, limit=1)
    [(failed_us,)] = sql(backend.url, "SELECT failed_us FROM keel_messages")
    assert isinstance(failed_us, int)
    assert before <= dead.failed_at <= datetime.now(UTC)
    assert dead.failed_at == datetime.fromtimestamp(0, UTC) + timedelta(microseconds=failed_us)
    assert await backend.dead_letters(APP, limit=0) == []


async def test_step_results_survive_closing_and_reopening(sqlite_url: str) -> None:
    first = await open_backend(sqlite_url, StoreOptions())
    try:
        await first.send(NewMessage(ref(), "m1", "{}"))
        claim = await claim_one(first, lease_s=0.2)
        await first.record_step(step_of(claim, "charge", {"id": "ch_1"}))
    finally:
        await first.aclose()
    assert sql(sqlite_url, "SELECT app, message_id, name, result, worker FROM keel_steps") == [
        (APP, "m1", "charge", '{"id": "ch_1"}', "w1")
    ]
    second = await open_backend(sqlite_url, StoreOptions())
    try:
        sql(sqlite_url, "UPDATE keel_instances SET lease_expires_us = 0")  # the first worker's lease ran out
        [again] = await second.claim(APP, ["loan"], worker="w2", lease_s=5, limit=1)
        assert (again.attempt, dict(again.steps)) == (2, {"charge": '{"id": "ch_1"}'})
    finally:
        await second.aclose()


async def test_a_retried_dead_letter_keeps_its_steps(backend: SqliteBackend) -> None:
    await send(backend, ref())
    claim = await claim_one(backend)
    await backend.record_step(step_of(claim, "charge", {"id": "ch_1"}))
    await backend.fail_turn(failure_of(claim))
    assert sql(backend.url, "SELECT paused, next_seq FROM keel_instances") == [(1, None)]
    assert await backend.resolve_dead_letter(ref(), skip=False) is not None
    assert sql(backend.url, "SELECT paused, next_seq FROM keel_instances") == [(0, 1)]
    assert sql(backend.url, "SELECT status, attempts, error, failed_us FROM keel_messages") == [
        ("pending", 0, None, None)
    ]
    again = await claim_one(backend)
    assert (again.attempt, dict(again.steps)) == (1, {"charge": '{"id": "ch_1"}'})

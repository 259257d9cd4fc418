"""PostgreSQL-only behaviour of waits for ends: only messages a client waits for NOTIFY, on their own channel, heard on
the one LISTEN connection, which a reconnect does not make lose an end. What every engine shares is in
tests/conformance/test_wait_for_end.py."""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql

from keel.backends.base import MessageStatus
from keel.backends.postgres.transactions import channel_for, end_channel_for
from tests._engine import APP, claim_one, commit_of, failure_of, ref, send
from tests.backends.postgres._support import db_rows, opened_backend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keel.backends.base import MessageInfo
    from keel.backends.postgres.backend import PostgresBackend

pytestmark = pytest.mark.postgres


@pytest.fixture(autouse=True)
def no_safety_rereads(backend: PostgresBackend) -> None:
    """Only a NOTIFY, or a re-read after a (re)LISTEN, may end these waits early."""
    backend.broker.ends.recheck_s = 300.0


async def parked(backend: PostgresBackend, message_id: str) -> asyncio.Task[MessageInfo | None]:
    """A wait for ``message_id``, parked once the listener LISTENs on the app's end channel."""
    waiting = asyncio.create_task(backend.wait_for_end(APP, message_id, timeout_s=30))
    channel = end_channel_for(await backend.broker._connection.current_schema(), APP)
    deadline = time.monotonic() + 5
    while channel not in backend.broker.listener._listening:
        assert time.monotonic() < deadline, "the listener never LISTENed on the end channel"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert not waiting.done()
    return waiting


@pytest.fixture
async def end_notifications(postgres_url: str, backend: PostgresBackend) -> AsyncIterator[list[str]]:
    """The payloads NOTIFYed on the app's end channel while the test runs, heard by a connection of the test's own."""
    heard: list[str] = []
    schema = await backend.broker._connection.current_schema()
    conn = await psycopg.AsyncConnection.connect(postgres_url.split("?")[0], autocommit=True)
    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(end_channel_for(schema, APP))))

    async def pump() -> None:
        async for notify in conn.notifies():
            heard.append(notify.payload)

    reading = asyncio.create_task(pump())
    try:
        yield heard
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await conn.close()


async def test_only_the_ends_of_messages_a_client_waits_for_notify(
    backend: PostgresBackend, other: PostgresBackend, end_notifications: list[str], postgres_url: str
) -> None:
    unwaited = await send(other, ref("quiet"))
    await other.commit_turn(commit_of(await claim_one(other)))
    waited = await send(other, ref("watched"))
    waiting = await parked(backend, waited)
    await other.commit_turn(commit_of(await claim_one(other)))
    info = await asyncio.wait_for(waiting, 5)
    assert info is not None and info.status is MessageStatus.done
    failing = await send(other, ref("failing"))
    waiting = await parked(backend, failing)
    await other.fail_turn(failure_of(await claim_one(other)))
    await asyncio.wait_for(waiting, 5)
    await asyncio.sleep(0.2)
    assert end_notifications == [waited, failing]  # never the unwaited one: its commit took no NOTIFY lock
    marked = db_rows(postgres_url, "SELECT message_id FROM keel_messages WHERE waited ORDER BY seq")
    assert marked == [(waited,), (failing,)]
    assert unwaited not in {row[0] for row in marked}


async def test_a_killed_listener_loses_no_end(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message_id = await send(other, ref())
    waiting = await parked(backend, message_id)
    listener = backend.broker.listener
    pid = listener.backend_pid
    assert pid is not None
    # Hold the reconnect until the end has been committed, so that its NOTIFY certainly reaches no one.
    committed = asyncio.Event()
    connect = listener._connect

    async def reconnect_after_the_commit() -> psycopg.AsyncConnection[tuple[object, ...]]:
        await committed.wait()
        return await connect()

    monkeypatch.setattr(listener, "_connect", reconnect_after_the_commit)
    assert db_rows(postgres_url, "SELECT pg_terminate_backend(%s, 5000)", pid) == [(True,)]
    await other.commit_turn(commit_of(await claim_one(other)))
    committed.set()
    ended_at = time.monotonic()
    info = await asyncio.wait_for(waiting, 10)
    assert time.monotonic() - ended_at < 2.0  # the re-read after the new LISTEN, not the 300 s safety re-read
    assert info is not None and info.status is MessageStatus.done
    assert listener.backend_pid not in {None, pid}


async def test_a_woken_wait_reads_without_marking_again(
    backend: PostgresBackend, other: PostgresBackend, postgres_url: str
) -> None:
    message_id = await send(other, ref())
    waiting = await parked(backend, message_id)
    row_version = "SELECT xmin::text FROM keel_messages WHERE message_id = %s"
    await other.commit_turn(commit_of(await claim_one(other)))
    # db_rows blocks the event loop: the wait cannot read between the commit and this, so this is the end's version.
    ended = db_rows(postgres_url, row_version, message_id)
    info = await asyncio.wait_for(waiting, 5)
    assert info is not None and info.status is MessageStatus.done
    assert db_rows(postgres_url, row_version, message_id) == ended  # the read after the NOTIFY wrote nothing


async def test_a_wait_marks_again_after_the_listener_reconnects(
    backend: PostgresBackend, other: PostgresBackend, end_notifications: list[str], postgres_url: str
) -> None:
    message_id = await send(other, ref())
    waiting = await parked(backend, message_id)
    # As if a server restart had lost the mark (committed without waiting for the disk) with the listener.
    db_rows(postgres_url, "UPDATE keel_messages SET waited = false WHERE message_id = %s", message_id)
    listener = backend.broker.listener
    pid = listener.backend_pid
    assert db_rows(postgres_url, "SELECT pg_terminate_backend(%s, 5000)", pid) == [(True,)]
    deadline = time.monotonic() + 5
    marked: list[tuple[object, ...]] = []
    while marked != [(True,)]:
        assert time.monotonic() < deadline, "the wait did not mark its message again after the reconnect"
        await asyncio.sleep(0.05)
        marked = db_rows(postgres_url, "SELECT waited FROM keel_messages WHERE message_id = %s", message_id)
    assert listener.backend_pid not in {None, pid}
    await other.commit_turn(commit_of(await claim_one(other)))
    info = await asyncio.wait_for(waiting, 2)  # the NOTIFY, not the 300 s safety re-read
    assert info is not None and info.status is MessageStatus.done
    assert end_notifications == [message_id]


async def test_parked_waits_hold_no_pooled_connection(postgres_url: str, other: PostgresBackend) -> None:
    async with opened_backend(f"{postgres_url}&pool_min_size=1&pool_max_size=1") as opened:
        sent = [await send(other, ref(f"i{n}")) for n in range(50)]
        waits = [asyncio.create_task(opened.wait_for_end(APP, message_id, timeout_s=30)) for message_id in sent]
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await send(opened, ref("through-the-pool"))  # needs the pool's only connection
        assert time.monotonic() - started < 0.5
        claims = await other.claim(APP, ["loan"], worker="w1", lease_s=30, limit=50)
        await asyncio.gather(*(other.commit_turn(commit_of(claim)) for claim in claims))
        infos = await asyncio.wait_for(asyncio.gather(*waits), 10)
        assert {info.status for info in infos if info is not None} == {MessageStatus.done}
        assert len(infos) == 50


def test_end_channels_are_identifiers_apart_from_work_channels() -> None:
    for app in ("Loans", "a" * 255, "ünï cödé / app.name"):
        channel = end_channel_for("s1", app)
        assert re.fullmatch(r"keel_ends_[a-z0-9_]+", channel)
        assert len(channel.encode()) <= 63
        assert channel != channel_for("s1", app)
    assert end_channel_for("s1", "loans") != end_channel_for("s2", "loans")
    assert end_channel_for("s1", "loans") != channel_for("s1", "ends_loans")

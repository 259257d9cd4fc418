"""PostgreSQL-only behaviour: migrations, table constraints, one-statement writes, pool recovery, time bounds."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

import keel
from keel.backends.base import StoredRecord, StoreOptions
from keel.backends.postgres.backend import open_engine
from keel.backends.postgres.migrate import SCHEMA_COMPONENT, SCHEMA_VERSION
from tests.backends.postgres._support import db_rows, opened_engine

if TYPE_CHECKING:
    from keel.backends.postgres.store import PostgresStore

pytestmark = pytest.mark.postgres

WRITER = "test:1"


def _tables(url: str, key: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    current = db_rows(url, "SELECT key, version, value, written_at, writer FROM keel_kv WHERE key = %s", key)
    past = db_rows(
        url, "SELECT key, version, value, written_at, writer FROM keel_kv_history WHERE key = %s ORDER BY version", key
    )
    return current, past


async def _pids(engine: PostgresStore, count: int) -> list[int]:
    """The server pids of ``count`` pooled connections, taken out together so they are distinct."""
    pool = engine.connection.pool
    conns = [await pool.getconn() for _ in range(count)]
    try:
        return [(await (await conn.execute("SELECT pg_backend_pid()")).fetchall())[0][0] for conn in conns]
    finally:
        for conn in conns:
            await pool.putconn(conn)


async def _first_success(engine: PostgresStore, key: str) -> StoredRecord | None:
    deadline = time.monotonic() + 10
    while True:
        try:
            return await engine.get(key)
        except keel.BackendUnavailable:
            assert time.monotonic() < deadline, "the pool did not replace its dead connections"
            await asyncio.sleep(0.1)


async def test_schema_version_is_recorded_once_when_stores_open_together(postgres_url: str) -> None:
    engines = await asyncio.gather(*(open_engine(postgres_url, StoreOptions()) for _ in range(6)))
    try:
        rows = db_rows(postgres_url, "SELECT component, version, migrated_at FROM keel_schema")
        assert [(c, v) for c, v, _ in rows] == [(SCHEMA_COMPONENT, SCHEMA_VERSION)]
        await engines[0].put("k", '"v"', expected_version=None, writer=WRITER)
        again = await open_engine(postgres_url, StoreOptions())
        await again.aclose()
        # Opening again migrates nothing: same row, same time, data untouched.
        assert db_rows(postgres_url, "SELECT component, version, migrated_at FROM keel_schema") == rows
        assert (await engines[-1].get("k")) is not None
    finally:
        for opened in engines:
            await opened.aclose()


async def test_a_schema_from_a_newer_keel_is_refused(postgres_url: str) -> None:
    await (await open_engine(postgres_url, StoreOptions())).aclose()  # creates the tables
    db_rows(postgres_url, "UPDATE keel_schema SET version = 99")
    with pytest.raises(keel.ConfigurationError, match="schema version 99"):
        await open_engine(postgres_url, StoreOptions())


async def test_a_search_path_without_a_schema_is_a_configuration_error(postgres_url: str) -> None:
    url = postgres_url.split("?", 1)[0] + "?options=-csearch_path%3Dkeel_no_such_schema"
    with pytest.raises(keel.ConfigurationError, match="search_path"):
        await open_engine(url, StoreOptions())


async def test_tables_live_in_the_schema_of_the_search_path(engine: PostgresStore, postgres_url: str) -> None:
    schema = str(conninfo_to_dict(postgres_url)["options"]).split("=", 1)[1]
    rows = db_rows(postgres_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", schema)
    store_tables = ["keel_kv", "keel_kv_history", "keel_schema"]
    runtime_tables = ["keel_instances", "keel_messages", "keel_state_history", "keel_turns", "keel_steps"]
    runtime_tables += ["keel_instance_tombstones", "keel_events"]
    assert sorted(r[0] for r in rows) == sorted(store_tables + runtime_tables)


async def test_history_holds_each_version_of_a_key_once(engine: PostgresStore, postgres_url: str) -> None:
    record = await engine.put("k", "1", expected_version=None, writer=WRITER)
    for n in range(2, 6):
        record = await engine.put("k", str(n), expected_version=record.version, writer=WRITER)
    _, past = _tables(postgres_url, "k")
    assert [(v, value) for _, v, value, _, _ in past] == [(n, str(n)) for n in range(1, 6)]
    with pytest.raises(psycopg.errors.UniqueViolation):
        db_rows(
            postgres_url,
            "INSERT INTO keel_kv_history (key, version, value, written_at, writer) "
            "VALUES ('k', 5, 'again', now(), 'x')",
        )


async def test_a_lost_compare_and_swap_changes_nothing(engine: PostgresStore, postgres_url: str) -> None:
    first = await engine.put("k", '"a"', expected_version=None, writer=WRITER)
    await engine.put("k", '"b"', expected_version=first.version, writer=WRITER)
    before = _tables(postgres_url, "k")
    with pytest.raises(keel.StaleWriteError) as stale:
        await engine.put("k", '"c"', expected_version=1, writer=WRITER)
    assert (stale.value.expected_version, stale.value.actual_version) == (1, 2)
    with pytest.raises(keel.StaleWriteError) as exists:
        await engine.put("k", '"c"', expected_version=None, writer=WRITER)
    assert (exists.value.expected_version, exists.value.actual_version) == (None, 2)
    with pytest.raises(keel.StaleWriteError):
        await engine.delete("k", expected_version=7, writer=WRITER)
    with pytest.raises(keel.StaleWriteError) as missing:
        await engine.put("other", '"c"', expected_version=1, writer=WRITER)
    assert missing.value.actual_version is None
    assert _tables(postgres_url, "k") == before
    assert _tables(postgres_url, "other") == ([], [])


async def test_a_delete_is_a_tombstone_and_versions_go_on_after_it(engine: PostgresStore, postgres_url: str) -> None:
    record = await engine.put("k", "1", expected_version=None, writer=WRITER)
    tombstone = await engine.delete("k", expected_version=record.version, writer=WRITER)
    assert (tombstone.version, tombstone.value_json) == (2, None)
    assert await engine.get("k") is None
    with pytest.raises(keel.StaleWriteError) as stale:
        await engine.delete("k", expected_version=2, writer=WRITER)
    assert stale.value.actual_version is None
    revived = await engine.put("k", "3", expected_version=None, writer=WRITER)
    assert revived.version == 3
    current, past = _tables(postgres_url, "k")
    assert [(row[1], row[2]) for row in current] == [(3, "3")]
    assert [(row[1], row[2]) for row in past] == [(1, "1"), (2, None), (3, "3")]


async def test_history_beyond_the_limit_is_trimmed_by_the_write_itself(postgres_url: str) -> None:
    async with opened_engine(postgres_url, StoreOptions(history_limit=3)) as engine:
        record = await engine.put("k", "1", expected_version=None, writer=WRITER)
        for n in range(2, 11):
            record = await engine.put("k", str(n), expected_version=record.version, writer=WRITER)
        kept = await engine.history("k", limit=100)
    assert [r.version for r in kept] == [10, 9, 8]
    assert [row[1] for row in _tables(postgres_url, "k")[1]] == [8, 9, 10]


async def test_history_limit_zero_writes_no_history_rows(postgres_url: str) -> None:
    async with opened_engine(postgres_url, StoreOptions(history_limit=0)) as engine:
        record = await engine.put("k", "1", expected_version=None, writer=WRITER)
        record = await engine.put("k", "2", expected_version=record.version, writer=WRITER)
        assert [(r.version, r.value_json) for r in await engine.history("k", limit=10)] == [(2, "2")]
        await engine.delete("k", expected_version=record.version, writer=WRITER)
        assert [(r.version, r.value_json) for r in await engine.history("k", limit=10)] == [(3, None)]
        assert await engine.history("never", limit=10) == []
    assert _tables(postgres_url, "k")[1] == []


async def test_written_at_is_the_server_clock_in_utc(engine: PostgresStore, postgres_url: str) -> None:
    before = db_rows(postgres_url, "SELECT clock_timestamp()")[0][0]
    record = await engine.put("k", "1", expected_version=None, writer=WRITER)
    after = db_rows(postgres_url, "SELECT clock_timestamp()")[0][0]
    assert record.written_at.tzinfo is UTC
    assert before <= record.written_at <= after
    fetched = await engine.get("k")
    assert fetched is not None
    assert fetched.written_at == record.written_at
    assert fetched.written_at.tzinfo is UTC
    assert abs((datetime.now(UTC) - fetched.written_at).total_seconds()) < 60


async def test_url_parameters_reach_the_pool_and_the_server(postgres_url: str) -> None:
    async with opened_engine(f"{postgres_url}&pool_max_size=3&query_timeout_s=7") as engine:
        assert engine.connection.pool.max_size == 3
        async with engine.connection.connection() as conn:
            cursor = await conn.execute("SELECT current_setting('statement_timeout'), current_schema")
            settings = await cursor.fetchone()
        assert settings is not None
        assert settings[0] == "7s"
        assert settings[1].startswith("keel_test_")  # the URL's own options survived


async def test_a_statement_that_waits_too_long_is_cut_off(postgres_url: str) -> None:
    engine = await open_engine(f"{postgres_url}&query_timeout_s=1", StoreOptions())
    await engine.put("k", "1", expected_version=None, writer=WRITER)
    try:
        with psycopg.connect(postgres_url) as blocker:  # holds the row lock until the block ends
            blocker.execute("SELECT 1 FROM keel_kv WHERE key = 'k' FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(keel.BackendUnavailable, match="statement timeout"):
                await engine.put("k", "2", expected_version=1, writer=WRITER)
            assert time.monotonic() - started < 5
        assert (await engine.put("k", "2", expected_version=1, writer=WRITER)).version == 2
    finally:
        await engine.aclose()


async def test_a_pool_with_every_connection_busy_is_overloaded_not_unavailable(postgres_url: str) -> None:
    async with opened_engine(f"{postgres_url}&pool_max_size=1&pool_timeout_s=0.5") as engine:
        async with engine.connection.pool.connection():
            with pytest.raises(keel.BackendOverloaded, match=r"waited 0\.5 s.*1 call was queued for 1 conn") as got:
                await engine.get("k")
        assert not isinstance(got.value, keel.BackendUnavailable)
        assert "pool_max_size=" in got.value.hint
        assert await engine.get("k") is None


async def test_the_pool_recovers_when_its_connections_are_killed(postgres_url: str) -> None:
    async with opened_engine(f"{postgres_url}&pool_min_size=3&pool_max_size=3") as engine:
        await engine.put("k", "1", expected_version=None, writer=WRITER)
        pids = await _pids(engine, 3)
        db_rows(postgres_url, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", pids)
        with pytest.raises(keel.BackendUnavailable) as caught:
            await engine.get("k")
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        record = await _first_success(engine, "k")
        assert record is not None
        assert record.value_json == "1"
        assert not set(pids) & set(await _pids(engine, 3))


async def test_closing_twice_is_fine_and_a_closed_store_says_so(postgres_url: str) -> None:
    engine = await open_engine(postgres_url, StoreOptions())
    await engine.aclose()
    await engine.aclose()
    with pytest.raises(keel.BackendUnavailable, match="closed"):
        await engine.get("k")


async def test_the_facade_round_trip(postgres_url: str) -> None:
    async with keel.open_store(postgres_url) as store:
        assert store.url == postgres_url
        first = await store.put("loan:1", {"step": 1}, expected_version=None)
        second = await store.update("loan:1", lambda s: {**s, "step": s["step"] + 1})
        await store.delete("loan:1", expected_version=second.version)
        assert await store.get("loan:1") is None
        past = await store.history("loan:1")
    assert [(v.version, v.value, v.deleted) for v in past] == [
        (3, None, True),
        (2, {"step": 2}, False),
        (first.version, {"step": 1}, False),
    ]


async def test_opening_with_the_server_down_fails_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(keel.BackendUnavailable, match="Connection refused") as caught:
        await open_engine(f"postgresql://postgres:pw@127.0.0.1:{port}/test", StoreOptions())
    assert time.monotonic() - started < 3
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    assert "pw" not in str(caught.value)

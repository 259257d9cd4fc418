"""Redis-only behaviour: the stored layout, the Lua compare-and-swap, the schema key, round trips, URLs,
errors, reconnection and the persistence warning. What every engine shares is in tests/conformance/."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

import keel
from keel.backends import open_backend
from keel.backends.base import StoreOptions
from keel.backends.redis.backend import open_engine
from keel.backends.redis.connection import Persistence, persistence_warning
from keel.backends.redis.migrate import STORE_SCHEMA_VERSION
from keel.backends.redis.store import RedisStore
from tests.backends.redis._server import free_port
from tests.backends.redis._support import STORE_LOGGER, count_commands, server_now, snapshot

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from redis.asyncio import Redis

WRITER = "test-host:1"


@pytest.fixture
async def engine(redis_url: str) -> AsyncIterator[RedisStore]:
    opened = await open_engine(redis_url, StoreOptions())
    yield opened
    await opened.aclose()


# -- layout ---------------------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_records_land_in_the_documented_keys(engine: RedisStore, raw: Redis) -> None:
    written = await engine.put("a{b}c", '{"n":1}', expected_version=None, writer=WRITER)
    assert sorted(await raw.keys("*")) == ["keel:kv:{a%7Bb%7Dc}", "keel:kvh:{a%7Bb%7Dc}", "keel:schema"]
    assert await raw.type("keel:kv:{a%7Bb%7Dc}") == "hash"
    current = await raw.hgetall("keel:kv:{a%7Bb%7Dc}")
    micros = int(current["t"])
    assert current == {"v": "1", "d": '{"n":1}', "t": str(micros), "w": WRITER}
    assert written.written_at == datetime.fromtimestamp(micros // 1_000_000, UTC).replace(microsecond=micros % 10**6)
    entries = [json.loads(e) for e in await raw.lrange("keel:kvh:{a%7Bb%7Dc}", 0, -1)]
    assert entries == [{"v": "1", "d": '{"n":1}', "t": str(micros), "w": WRITER}]


@pytest.mark.redis
async def test_a_tombstone_keeps_the_version_and_drops_the_value(engine: RedisStore, raw: Redis) -> None:
    await engine.put("k", "1", expected_version=None, writer=WRITER)
    tombstone = await engine.delete("k", expected_version=1, writer=WRITER)
    assert (tombstone.version, tombstone.value_json) == (2, None)
    current = await raw.hgetall("keel:kv:{k}")
    assert current["v"] == "2"
    assert "d" not in current
    newest = json.loads(str(await raw.lindex("keel:kvh:{k}", 0)))
    assert newest["v"] == "2"
    assert "d" not in newest
    recreated = await engine.put("k", "3", expected_version=None, writer=WRITER)
    assert recreated.version == 3


@pytest.mark.redis
async def test_keys_with_braces_do_not_collide(engine: RedisStore) -> None:
    keys = ["{", "}", "{}", "%7B", "a{b}", "a%7Bb%7D"]
    for i, key in enumerate(keys):
        await engine.put(key, str(i), expected_version=None, writer=WRITER)
    for i, key in enumerate(keys):
        record = await engine.get(key)
        assert record is not None
        assert (record.value_json, record.version) == (str(i), 1)


# -- compare-and-swap -----------------------------------------------------------------------------------------------

StaleCall = Callable[[RedisStore], Awaitable[object]]

STALE_WRITES: list[tuple[str, StaleCall, int | None]] = [
    ("create over a live key", lambda e: e.put("live", "x", expected_version=None, writer=WRITER), 2),
    ("put on an old version", lambda e: e.put("live", "x", expected_version=1, writer=WRITER), 2),
    ("put on a future version", lambda e: e.put("live", "x", expected_version=3, writer=WRITER), 2),
    ("delete of an old version", lambda e: e.delete("live", expected_version=1, writer=WRITER), 2),
    ("put on a tombstone's version", lambda e: e.put("gone", "x", expected_version=2, writer=WRITER), None),
    ("delete of a tombstone", lambda e: e.delete("gone", expected_version=2, writer=WRITER), None),
    ("put on an absent key", lambda e: e.put("absent", "x", expected_version=1, writer=WRITER), None),
    ("delete of an absent key", lambda e: e.delete("absent", expected_version=1, writer=WRITER), None),
]


@pytest.mark.redis
@pytest.mark.parametrize(("case", "call", "actual"), STALE_WRITES, ids=[c[0] for c in STALE_WRITES])
async def test_a_stale_write_changes_nothing(
    engine: RedisStore, raw: Redis, case: str, call: StaleCall, actual: int | None
) -> None:
    await engine.put("live", "1", expected_version=None, writer=WRITER)
    await engine.put("live", "2", expected_version=1, writer=WRITER)
    await engine.put("gone", "1", expected_version=None, writer=WRITER)
    await engine.delete("gone", expected_version=1, writer=WRITER)
    before = await snapshot(raw)
    with pytest.raises(keel.StaleWriteError) as caught:
        await call(engine)
    assert caught.value.actual_version == actual
    assert await snapshot(raw) == before


@pytest.mark.redis
async def test_history_is_trimmed_by_the_write_itself(redis_url: str, raw: Redis) -> None:
    engine = await open_engine(redis_url, StoreOptions(history_limit=3))
    try:
        for version in range(5):
            await engine.put("k", str(version), expected_version=version or None, writer=WRITER)
        assert await raw.llen("keel:kvh:{k}") == 3
        assert [r.version for r in await engine.history("k", limit=10)] == [5, 4, 3]
        assert [r.version for r in await engine.history("k", limit=2)] == [5, 4]
    finally:
        await engine.aclose()


@pytest.mark.redis
async def test_history_limit_zero_keeps_no_list(redis_url: str, raw: Redis) -> None:
    keeping = await open_engine(redis_url, StoreOptions(history_limit=5))
    keeping_none = await open_engine(redis_url, StoreOptions(history_limit=0))
    try:
        await keeping.put("k", "1", expected_version=None, writer=WRITER)
        await keeping_none.put("k", "2", expected_version=1, writer=WRITER)
        assert not await raw.exists("keel:kvh:{k}")  # the old list goes with the first write that keeps none
        assert [(r.version, r.value_json) for r in await keeping_none.history("k", limit=10)] == [(2, "2")]
        await keeping_none.delete("k", expected_version=2, writer=WRITER)
        assert [(r.version, r.value_json) for r in await keeping_none.history("k", limit=10)] == [(3, None)]
        assert await keeping_none.history("never", limit=10) == []
    finally:
        await keeping.aclose()
        await keeping_none.aclose()


@pytest.mark.redis
async def test_written_at_comes_from_the_server_clock(engine: RedisStore, raw: Redis) -> None:
    now = await server_now(raw)
    record = await engine.put("k", "1", expected_version=None, writer=WRITER)
    assert record.written_at.tzinfo is UTC
    assert abs((record.written_at - now).total_seconds()) < 2
    stored = await engine.get("k")
    assert stored is not None
    assert stored.written_at == record.written_at
    assert (await engine.history("k", limit=1))[0].written_at == record.written_at


@pytest.mark.redis
async def test_values_round_trip_through_lua_json(redis_url: str) -> None:
    value = {"text": 'ü ß 漢字 / \\ "quoted"\n\t', "n": 12345678901234567, "f": 0.1, "nested": [None, True, {}]}
    async with keel.open_store(redis_url) as store:
        await store.put("k", value, expected_version=None)
        got = await store.get("k")
        past = await store.history("k")
    assert got is not None
    assert got.value == value
    assert past[0].value == value


@pytest.mark.redis
async def test_each_operation_is_one_round_trip(engine: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_commands(monkeypatch, engine.connection.client)
    operations: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("create", lambda: engine.put("k", "1", expected_version=None, writer=WRITER)),
        ("put", lambda: engine.put("k", "2", expected_version=1, writer=WRITER)),
        ("get", lambda: engine.get("k")),
        ("history", lambda: engine.history("k", limit=10)),
        ("delete", lambda: engine.delete("k", expected_version=2, writer=WRITER)),
    ]
    for name, operation in operations:
        sent.clear()
        await operation()
        assert len(sent) == 1, f"{name} sent {sent}"


@pytest.mark.redis
async def test_more_concurrent_writers_than_pooled_connections(redis_url: str) -> None:
    async with keel.open_store(redis_url) as store:
        results = await asyncio.gather(
            *(store.update("counter", lambda n: n + 1, default=0, deadline_s=60) for _ in range(120))
        )
        final = await store.get("counter")
    assert final is not None
    assert final.value == 120
    assert sorted(r.version for r in results) == list(range(1, 121))


# -- schema ---------------------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_schema_version_is_written_at_connect(redis_url: str, raw: Redis) -> None:
    async with keel.open_store(redis_url):
        pass
    assert await raw.hgetall("keel:schema") == {"store": str(STORE_SCHEMA_VERSION)}


@pytest.mark.redis
async def test_data_from_a_newer_keel_is_refused(redis_url: str, raw: Redis) -> None:
    newer = str(STORE_SCHEMA_VERSION + 1)
    await raw.hset("keel:schema", "store", newer)
    with pytest.raises(keel.ConfigurationError, match="newer"):
        async with keel.open_store(redis_url):
            pass
    assert await raw.hgetall("keel:schema") == {"store": newer}


@pytest.mark.redis
async def test_prefix_from_the_url_namespaces_every_key(redis_url: str, raw: Redis) -> None:
    async with keel.open_store(f"{redis_url}?prefix=app") as store, keel.open_store(redis_url) as default:
        await store.put("k", 1, expected_version=None)
        await default.put("k", 2, expected_version=None)
        mine = await store.get("k")
    assert mine is not None
    assert mine.value == 1
    assert sorted(await raw.keys("app:*")) == ["app:kv:{k}", "app:kvh:{k}", "app:schema"]


# -- URLs and errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/abc", "DB index"),
        ("redis://127.0.0.1:6379/0?no_such_option=1", "no_such_option"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://127.0.0.1:6379/0?prefix=a{b", "prefix"),
        ("redis://127.0.0.1:6379/0?pool_timeout_s=soon", "pool_timeout_s='soon'.*positive number of seconds"),
        ("redis://127.0.0.1:6379/0?pool_timeout_s=0", "pool_timeout_s='0'"),
    ],
)
async def test_bad_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(keel.ConfigurationError, match=message):
        await open_engine(url, StoreOptions())


@pytest.mark.parametrize("auth", ["user:s3cret@", ""])
async def test_an_unreachable_server_fails_fast_with_the_password_masked(auth: str) -> None:
    query = "" if auth else "?password=s3cret"
    url = f"redis://{auth}127.0.0.1:{free_port()}/0{query}"
    started = time.monotonic()
    with pytest.raises(keel.BackendUnavailable) as caught:
        async with keel.open_store(url):
            pass
    assert time.monotonic() - started < 6
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in caught.value.url
    assert "redis-server running" in caught.value.hint
    assert isinstance(caught.value.__cause__, RedisConnectionError)


@pytest.mark.redis
async def test_a_dropped_connection_is_replaced_on_the_next_call(engine: RedisStore, raw: Redis) -> None:
    await engine.put("k", "1", expected_version=None, writer=WRITER)
    own_id = await engine.connection.client.client_id()
    assert await raw.client_kill_filter(_id=str(own_id)) == 1
    await asyncio.sleep(0.1)  # let the loop see the closed socket, as it would between two requests
    written = await engine.put("k", "2", expected_version=1, writer=WRITER)
    assert written.version == 2
    assert await engine.connection.client.client_id() != own_id


# -- persistence ----------------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_persistence_warning_is_logged_once_at_connect(
    redis_url: str, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    config = {**await raw.config_get("append*"), **await raw.config_get("save")}
    durable = config["appendonly"] == "yes" and config["appendfsync"] == "always"
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        async with keel.open_store(redis_url) as store:
            await store.put("k", 1, expected_version=None)
            await store.get("k")
    warnings = [r for r in caplog.records if r.name == STORE_LOGGER]
    if durable:
        assert warnings == []
        return
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING
    assert redis_url in message
    assert "appendonly yes and appendfsync always" in message
    if config["appendonly"] == "no" and config["save"] == "":
        assert "loses every stored value and all history" in message


@pytest.mark.parametrize(
    ("persistence", "expected"),
    [
        (Persistence(appendonly=True, appendfsync="always", save=""), None),
        (Persistence(appendonly=False, appendfsync="always", save=""), "every stored value and all history"),
        (Persistence(appendonly=False, appendfsync="everysec", save="3600 1"), "since the last RDB snapshot"),
        (Persistence(appendonly=False, appendfsync=None, save=None), "if snapshots are off too"),
        (Persistence(appendonly=True, appendfsync="everysec", save=""), "up to about a second"),
        (Persistence(appendonly=True, appendfsync="no", save=""), "not yet flushed"),
        (Persistence(appendonly=True, appendfsync=None, save=None), "could not be read"),
        (None, "could not read"),
    ],
)
def test_persistence_warning_says_what_a_restart_loses(persistence: Persistence | None, expected: str | None) -> None:
    warning = persistence_warning(persistence)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None
        assert expected in warning


@pytest.mark.redis
async def test_a_closed_store_refuses_calls_and_closes_twice(redis_url: str) -> None:
    engine = await open_engine(redis_url, StoreOptions())
    await engine.aclose()
    await engine.aclose()
    with pytest.raises(keel.BackendUnavailable, match="closed"):
        await engine.get("k")


async def test_pool_timeout_s_bounds_the_wait_for_a_pooled_connection(redis_url: str) -> None:
    backend = await open_backend(f"{redis_url}?max_connections=1&pool_timeout_s=0.01&socket_timeout=3", StoreOptions())
    try:
        outcomes = await asyncio.gather(*(backend.message("app", f"m{n}") for n in range(300)), return_exceptions=True)
    finally:
        await backend.aclose()
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert errors, "300 calls at once on one connection all got it within 10 ms"
    assert all(isinstance(error, keel.BackendOverloaded) for error in errors), errors
    assert "?max_connections= or ?pool_timeout_s=" in str(errors[0])

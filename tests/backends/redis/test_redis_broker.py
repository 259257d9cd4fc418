"""Redis-only behaviour of the runtime: the stored layout, the Lua scripts' fencing, the wake stream, and the
schema step. What every engine shares (claims from separate backends and processes too) is in tests/conformance/."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from redis.crc import key_slot

import keel
from keel.backends import open_backend
from keel.backends.base import (
    STATE_HISTORY_LIMIT,
    MessageStatus,
    StoreOptions,
    TurnFailure,
)
from keel.backends.redis import broker as redis_broker
from keel.backends.redis.migrate import STORE_SCHEMA_VERSION
from keel.backends.redis.wake import WAIT_BLOCK_S, block_seconds
from tests._engine import APP, claim_one, commit_of, ref, send, step_of
from tests.backends.redis._support import STORE_LOGGER, count_commands, micros, reopen, server_now, snapshot

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from keel.backends.base import Backend
    from keel.backends.redis.backend import RedisBackend

pytestmark = pytest.mark.redis


# -- layout ---------------------------------------------------------------------------------------------------------


async def test_runtime_keys_land_in_the_documented_layout(backend: Backend, raw: Redis) -> None:
    instance = ref("a{b}/c")
    message_id = await send(backend, instance, {"n": 1}, key="req-1")
    claim = await claim_one(backend)
    await backend.commit_turn(commit_of(claim, {"step": 1}))
    member = "loans/loan/a%7Bb%7D%2Fc"
    expected = {
        f"keel:inst:{{{member}}}": "hash",
        f"keel:msg:{{{member}}}:{message_id}": "hash",
        f"keel:ids:{{{member}}}": "set",
        f"keel:idem:{{{member}}}": "hash",
        f"keel:states:{{{member}}}": "list",
        f"keel:turns:{{{member}}}": "list",
        "keel:seq:{loans}": "string",
        "keel:msgindex:{loans}": "hash",
        "keel:finkeyed:{loans}": "zset",
        "keel:turnidx:{loans}": "zset",
        "keel:wake:{loans}": "stream",
        "keel:schema": "hash",
    }  # the inbox, ready, leased and finished keys are empty now, so Redis has dropped them
    assert {name: await raw.type(name) for name in await raw.keys("*")} == expected
    instance_slots = {key_slot(name.encode()) for name in expected if member in name}
    app_slots = {key_slot(name.encode()) for name in expected if "{loans}" in name}
    assert instance_slots == {key_slot(member.encode())}
    assert app_slots == {key_slot(b"loans")}
    fields = await raw.hgetall(f"keel:inst:{{{member}}}")
    expected_fields = {"tok": "1", "kind": "workflow", "v": "1", "d": '{"step": 1}', "w": "w1"}
    assert {k: v for k, v in fields.items() if k != "t"} == expected_fields
    message = await raw.hgetall(f"keel:msg:{{{member}}}:{message_id}")
    sent_at, finished_at = message.pop("a"), message.pop("x")
    assert message == {
        "p": '{"n": 1}',
        "s": "done",
        "n": "1",
        "q": "1",
        "i": member,
        "v": "1",
        "r": sent_at,
        "k": "req-1",
    }
    assert int(sent_at) <= int(finished_at) == int(fields["t"])
    assert await raw.hgetall(f"keel:idem:{{{member}}}") == {"req-1": message_id}
    assert await raw.hgetall("keel:msgindex:{loans}") == {message_id: member}
    assert await raw.smembers(f"keel:ids:{{{member}}}") == {message_id}
    assert await raw.zrange("keel:finkeyed:{loans}", 0, -1, withscores=True) == [(message_id, float(sent_at))]
    [turn] = await backend.turns(instance, limit=5)
    started = micros(turn.started_at)
    assert await raw.zrange("keel:turnidx:{loans}", 0, -1, withscores=True) == [(member, float(started))]


async def _visible_at(raw: Redis, member: str, message_id: str) -> float:
    return float(await raw.hget(f"keel:msg:{{{member}}}:{message_id}", "r") or "nan")


async def test_pending_and_leased_instances_sit_in_their_sorted_sets(backend: Backend, raw: Redis) -> None:
    ids = [await send(backend, ref(workflow_id)) for workflow_id in ("a", "b", "a")]
    visible = [await _visible_at(raw, f"loans/loan/{w}", i) for w, i in zip("aba", ids, strict=True)]
    assert visible == sorted(visible)
    assert await raw.zrange("keel:ready:{loans}:loan", 0, -1, withscores=True) == [
        ("loans/loan/a", visible[0]),
        ("loans/loan/b", visible[1]),
    ]
    assert await raw.zrange("keel:inbox:{loans/loan/a}", 0, -1, withscores=True) == [
        (f"{1:016d}:{ids[0]}", visible[0]),
        (f"{3:016d}:{ids[2]}", visible[2]),
    ]
    claim = await claim_one(backend, lease_s=30)
    assert claim.instance == ref("a")
    expiry = micros(claim.lease_expires_at)
    assert await raw.zrange("keel:leased:{loans}:loan", 0, -1, withscores=True) == [("loans/loan/a", float(expiry))]
    assert await raw.zrange("keel:ready:{loans}:loan", 0, -1) == ["loans/loan/b"]
    await backend.commit_turn(commit_of(claim))
    # a's second message (sent third) puts it back behind b.
    assert await raw.zrange("keel:ready:{loans}:loan", 0, -1, withscores=True) == [
        ("loans/loan/b", visible[1]),
        ("loans/loan/a", visible[2]),
    ]
    assert await raw.zcard("keel:leased:{loans}:loan") == 0


async def test_state_history_and_turns_are_trimmed_by_the_commit(
    backend: Backend, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_broker, "TURNS_LIMIT", 3)
    for n in range(STATE_HISTORY_LIMIT + 2):
        await send(backend, ref(), {"n": n})
        await backend.commit_turn(commit_of(await claim_one(backend), {"n": n}))
    states = [json.loads(e) for e in await raw.lrange("keel:states:{loans/loan/42}", 0, -1)]
    assert [int(s["v"]) for s in states] == list(range(STATE_HISTORY_LIMIT + 2, 2, -1))
    assert [json.loads(s["d"]) for s in states[:2]] == [{"n": 11}, {"n": 10}]
    turns = await backend.turns(ref(), limit=100)
    assert [t.version_written for t in turns] == [12, 11, 10]


# -- time -----------------------------------------------------------------------------------------------------------


async def test_lease_expiry_and_written_at_come_from_the_server_clock(backend: Backend, raw: Redis) -> None:
    await send(backend, ref())
    before = await server_now(raw)
    claim = await claim_one(backend, lease_s=60)
    after = await server_now(raw)
    assert before + timedelta(seconds=60) <= claim.lease_expires_at <= after + timedelta(seconds=60)
    await backend.commit_turn(commit_of(claim))
    state = await backend.state(ref())
    assert state is not None
    assert state.written_at.tzinfo is UTC
    assert after <= state.written_at <= await server_now(raw)


# -- fencing --------------------------------------------------------------------------------------------------------


async def test_fenced_out_scripts_change_no_key(backend: Backend, raw: Redis) -> None:
    await send(backend, ref(), {"n": 1})
    await send(backend, ref(), {"n": 2})
    zombie = await claim_one(backend, worker="zombie", lease_s=0.1)
    await asyncio.sleep(0.2)
    owner = await claim_one(backend, worker="owner")
    before = await snapshot(raw)
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.commit_turn(commit_of(zombie, {"by": "zombie"}, worker="zombie"))
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.fail_turn(TurnFailure(zombie, "boom", "zombie", datetime.now(UTC), 0.1))
    await backend.release(zombie)
    assert await backend.renew([zombie], lease_s=5) == [False]
    assert await snapshot(raw) == before
    assert await backend.commit_turn(commit_of(owner, {"by": "owner"}, worker="owner")) == 1


async def test_a_commit_after_expiry_changes_no_key(backend: Backend, raw: Redis) -> None:
    await send(backend, ref())
    claim = await claim_one(backend, lease_s=0.1)
    await asyncio.sleep(0.2)
    before = await snapshot(raw)
    with pytest.raises(keel.LeaseLostError, match="expired") as caught:
        await backend.commit_turn(commit_of(claim))
    assert caught.value.fencing_token == claim.fencing_token
    assert await snapshot(raw) == before
    info = await backend.message(APP, claim.message_id)
    assert info is not None and info.status is MessageStatus.pending


# -- waking ---------------------------------------------------------------------------------------------------------


async def test_each_wait_starts_after_the_last_send_it_saw(backend: Backend, other: Backend) -> None:
    await send(other, ref("1"))
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=0.3)  # no claim yet: only sends from now on wake it
    assert time.monotonic() - started >= 0.25
    await send(other, ref("2"))
    await backend.wait_for_work(APP, timeout_s=5)
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=0.3)  # the send it woke for does not wake it again
    assert time.monotonic() - started >= 0.25


async def test_waits_hold_no_connection_of_the_main_pool(redis_url: str) -> None:
    opened = await open_backend(f"{redis_url}?max_connections=1", StoreOptions())
    try:
        waiting = asyncio.create_task(opened.wait_for_work("idle-app", timeout_s=3))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await send(opened, ref())
        assert len(await opened.claim(APP, ["loan"], worker="w1", lease_s=5, limit=1)) == 1
        assert time.monotonic() - started < 1.0
        waiting.cancel()
    finally:
        await opened.aclose()


def test_blocking_reads_end_before_the_socket_timeout() -> None:
    assert block_seconds(None) == WAIT_BLOCK_S
    assert block_seconds(WAIT_BLOCK_S + 5) == WAIT_BLOCK_S
    assert block_seconds(2.0) == 1.0
    assert block_seconds(0.5) == 0.25


# -- round trips, schema, errors ------------------------------------------------------------------------------------


async def test_each_runtime_write_is_one_script_call(backend: RedisBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_commands(monkeypatch, backend.store.connection.client)
    await send(backend, ref("a"), key="k")
    await send(backend, ref("b"))
    [a, b] = await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=2)
    await backend.renew([a, b], lease_s=5)
    await backend.commit_turn(commit_of(a))
    await backend.fail_turn(TurnFailure(b, "boom", "w1", datetime.now(UTC), 0.1))
    await send(backend, ref("c"))
    await backend.release(await claim_one(backend))
    c = await claim_one(backend)
    await backend.record_step(step_of(c, "s", 1))
    await backend.retry_turn(TurnFailure(c, "flaky", "w1", datetime.now(UTC), 0.1), delay_s=0)
    await backend.dead_letters(APP, limit=10)
    await backend.resolve_dead_letter(ref("b"), skip=True)
    await backend.delete_instance(ref("b"))
    assert sent == ["EVALSHA"] * 15
    sent.clear()
    now = datetime.now(UTC)
    await backend.prune(APP, finished_before=now, keys_before=now)
    assert sent == ["EVALSHA"] * 4  # one bounded batch per mode (the two event indexes share one) when little is due


async def test_the_schema_step_upgrades_a_store_only_database(
    redis_url: str, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # What the store-only keel (schema 1) left: its schema field and one key with one version.
    await raw.hset("keel:schema", "store", "1")
    await raw.hset("keel:kv:{k}", mapping={"v": "1", "d": '{"n": 1}', "t": "1700000000000000", "w": "old:1"})
    entry = {"v": "1", "d": '{"n": 1}', "t": "1700000000000000", "w": "old:1"}
    await raw.lpush("keel:kvh:{k}", json.dumps(entry))
    with caplog.at_level(logging.INFO, logger=STORE_LOGGER):
        opened = await open_backend(redis_url, StoreOptions())
    try:
        assert await raw.hgetall("keel:schema") == {"store": str(STORE_SCHEMA_VERSION)}
        assert any(
            f"upgraded from schema 1 to {STORE_SCHEMA_VERSION}" in r.getMessage()
            for r in caplog.records
            if r.name == STORE_LOGGER
        )
        record = await opened.store.get("k")
        assert record is not None and (record.version, record.value_json) == (1, '{"n": 1}')
        await send(opened, ref())
        assert await opened.commit_turn(commit_of(await claim_one(opened))) == 1
    finally:
        await opened.aclose()
    await reopen(redis_url)  # a second open changes nothing
    assert await raw.hgetall("keel:schema") == {"store": str(STORE_SCHEMA_VERSION)}


async def test_a_closed_backend_refuses_calls_and_closes_twice(redis_url: str) -> None:
    opened = await open_backend(redis_url, StoreOptions())
    await opened.aclose()
    await opened.aclose()
    with pytest.raises(keel.BackendUnavailable, match="closed"):
        await send(opened, ref())
    with pytest.raises(keel.BackendUnavailable, match="closed"):
        await opened.wait_for_work(APP, timeout_s=1)


async def test_the_url_prefix_namespaces_every_runtime_key(redis_url: str, raw: Redis) -> None:
    opened = await open_backend(f"{redis_url}?prefix=tenant", StoreOptions())
    try:
        await send(opened, ref("a"))
        await send(opened, ref("a"))
        await send(opened, ref("b"))
        claims = await opened.claim(APP, ["loan"], worker="w1", lease_s=0.1, limit=1)
        await asyncio.sleep(0.2)  # the next claim sweeps the expired lease with keys it names itself
        [again, other] = await opened.claim(APP, ["loan"], worker="w1", lease_s=5, limit=2)
        assert (again.message_id, other.instance) == (claims[0].message_id, ref("b"))
        await opened.commit_turn(commit_of(again))
        await opened.release(other)
        assert len(await opened.claim(APP, ["loan"], worker="w1", lease_s=5, limit=5)) == 2
    finally:
        await opened.aclose()
    names = [str(name) for name in await raw.keys("*")]
    assert names and all(name.startswith("tenant:") for name in names)

"""Redis-only behaviour of steps, retries and dead letters: the step hashes, the hold in the leased set, the
dead set, the lease reasons the scripts give, and the schema step from layout 2 to 3. What every engine shares
is in tests/conformance/."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import MessageStatus, StoreOptions
from keel.backends.redis import migrate
from keel.backends.redis.keys import RedisKeys
from keel.backends.redis.migrate import STORE_SCHEMA_VERSION, upgrade_layout
from tests._engine import APP, claim_one, commit_of, failure_of, ref, send, step_of
from tests.backends.redis._support import EPOCH, MIGRATE_LOGGER, micros, prefixed_url, reopen, server_now, snapshot

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from keel.backends.base import Backend

pytestmark = pytest.mark.redis


# -- steps ----------------------------------------------------------------------------------------------------------


async def test_step_results_live_in_one_hash_per_message(backend: Backend, raw: Redis) -> None:
    message_id = await send(backend, ref())
    claim = await claim_one(backend)
    await backend.record_step(step_of(claim, "score", 0.75))
    await backend.record_step(step_of(claim, "score", 0.1))
    await backend.record_step(step_of(claim, "a{b}", {"ok": True}))
    steps_key = f"keel:steps:{{loans/loan/42}}:{message_id}"
    assert await raw.hgetall(steps_key) == {"score": "0.75", "a{b}": '{"ok": true}'}
    await backend.release(claim)
    again = await claim_one(backend)
    assert dict(again.steps) == {"score": "0.75", "a{b}": '{"ok": true}'}
    await backend.commit_turn(commit_of(again))
    assert await raw.exists(steps_key)  # kept until its message is pruned


# -- holds ----------------------------------------------------------------------------------------------------------


async def test_a_hold_sits_in_the_leased_set_and_no_claim_takes_it_before_it_ends(
    backend: Backend, other: Backend, raw: Redis
) -> None:
    first_id = await send(backend, ref())
    claim = await claim_one(backend)
    before = await server_now(raw)
    await backend.retry_turn(failure_of(claim), delay_s=0.8)
    after = await server_now(raw)
    [(member, score)] = cast(
        "list[tuple[str, float]]", await raw.zrange("keel:leased:{loans}:loan", 0, -1, withscores=True)
    )
    assert member == "loans/loan/42"
    assert micros(before + timedelta(seconds=0.8)) <= score <= micros(after + timedelta(seconds=0.8))
    assert await raw.zcard("keel:ready:{loans}:loan") == 0
    fields = await raw.hgetall("keel:inst:{loans/loan/42}")
    assert "own" not in fields and fields["exp"] == str(int(score))  # released, but held
    await send(other, ref())  # a send during the hold does not make it claimable
    assert await raw.zcard("keel:ready:{loans}:loan") == 0
    held = await snapshot(raw)
    await backend.release(claim)  # a hold is not a lease: releasing the retried claim does not end it
    assert await backend.renew([claim], lease_s=5) == [False]
    assert await snapshot(raw) == held
    assert await other.claim(APP, ["loan"], worker="w2", lease_s=5, limit=5) == []
    await asyncio.sleep(max(0.0, (score - micros(await server_now(raw))) / 1e6) + 0.05)
    again = await claim_one(other)
    assert (again.message_id, again.attempt, again.fencing_token) == (first_id, 2, claim.fencing_token + 1)
    assert await raw.zrange("keel:leased:{loans}:loan", 0, -1) == ["loans/loan/42"]
    assert await raw.zcard("keel:ready:{loans}:loan") == 0


# -- fencing --------------------------------------------------------------------------------------------------------


async def test_fenced_out_steps_and_retries_change_no_key(backend: Backend, raw: Redis) -> None:
    await send(backend, ref())
    zombie = await claim_one(backend, lease_s=0.1)
    await backend.record_step(step_of(zombie, "early", 1))
    await asyncio.sleep(0.2)
    owner = await claim_one(backend)
    before = await snapshot(raw)
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.record_step(step_of(zombie, "late", 2))
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.retry_turn(failure_of(zombie), delay_s=60)
    assert await snapshot(raw) == before
    assert dict(owner.steps) == {"early": "1"}


@pytest.mark.parametrize("let_go", ["commit", "release", "retry", "fail"])
async def test_a_claim_let_go_is_told_its_lease_was_released(backend: Backend, raw: Redis, let_go: str) -> None:
    await send(backend, ref())
    claim = await claim_one(backend, lease_s=60)
    if let_go == "commit":
        await backend.commit_turn(commit_of(claim))
    elif let_go == "release":
        await backend.release(claim)
    elif let_go == "retry":
        await backend.retry_turn(failure_of(claim), delay_s=60)
    else:
        await backend.fail_turn(failure_of(claim))
    before = await snapshot(raw)
    with pytest.raises(keel.LeaseLostError, match="the lease was released"):
        await backend.record_step(step_of(claim, "late", 1))
    with pytest.raises(keel.LeaseLostError, match="the lease was released"):
        await backend.retry_turn(failure_of(claim), delay_s=1)
    with pytest.raises(keel.LeaseLostError, match="the lease was released"):
        await backend.fail_turn(failure_of(claim))
    assert await backend.renew([claim], lease_s=5) == [False]
    assert await snapshot(raw) == before


async def test_a_lease_swept_back_to_ready_is_reported_expired_not_released(backend: Backend, raw: Redis) -> None:
    await send(backend, ref("a"))
    await send(backend, ref("b"))
    first = await claim_one(backend, lease_s=60)
    swept = await claim_one(backend, lease_s=0.1)
    assert (first.instance, swept.instance) == (ref("a"), ref("b"))
    await backend.release(first)
    await asyncio.sleep(0.2)
    assert (await claim_one(backend)).instance == ref("a")  # this claim swept b back to ready, and left it there
    assert await raw.zrange("keel:ready:{loans}:loan", 0, -1) == ["loans/loan/b"]
    assert await raw.hget("keel:inst:{loans/loan/b}", "lapsed") is not None
    with pytest.raises(keel.LeaseLostError, match="the lease expired"):
        await backend.commit_turn(commit_of(swept))
    again = await claim_one(backend)
    assert again.instance == ref("b")
    assert await raw.hget("keel:inst:{loans/loan/b}", "lapsed") is None


# -- dead letters ---------------------------------------------------------------------------------------------------


async def test_dead_letters_sit_in_the_app_dead_set_newest_first(backend: Backend, raw: Redis) -> None:
    ids = [await send(backend, ref(str(n))) for n in range(3)]
    for n in range(3):
        await backend.fail_turn(failure_of(await claim_one(backend), f"boom {n}"))
    scores = dict(cast("list[tuple[str, float]]", await raw.zrange("keel:dead:{loans}", 0, -1, withscores=True)))
    assert sorted(scores) == sorted(ids)
    for message_id in ids:
        member = cast("str", await raw.hget("keel:msgindex:{loans}", message_id))
        assert await raw.hget(f"keel:msg:{{{member}}}:{message_id}", "f") == str(int(scores[message_id]))
    letters = await backend.dead_letters(APP, limit=2)
    assert [d.message_id for d in letters] == [ids[2], ids[1]]
    assert [(d.error, d.attempts) for d in letters] == [("boom 2", 1), ("boom 1", 1)]
    assert letters[0].failed_at == EPOCH + timedelta(microseconds=int(scores[ids[2]]))
    assert abs((letters[0].failed_at - await server_now(raw)).total_seconds()) < 5
    assert await backend.dead_letters(APP, limit=0) == []


async def test_a_retried_dead_letter_leaves_the_dead_set_and_runs_first(backend: Backend, raw: Redis) -> None:
    dead_id = await send(backend, ref())
    await send(backend, ref())
    claim = await claim_one(backend)
    await backend.record_step(step_of(claim, "paid", True))
    await backend.fail_turn(failure_of(claim))
    assert await backend.resolve_dead_letter(ref(), skip=False) == dead_id
    assert await raw.zcard("keel:dead:{loans}") == 0
    message = await raw.hgetall(f"keel:msg:{{loans/loan/42}}:{dead_id}")
    assert (message["s"], message["n"], "e" in message, "f" in message) == ("pending", "0", False, False)
    assert "paused" not in await raw.hgetall("keel:inst:{loans/loan/42}")
    again = await claim_one(backend)
    assert (again.message_id, again.attempt, dict(again.steps)) == (dead_id, 1, {"paid": "true"})
    assert await backend.resolve_dead_letter(ref(), skip=False) is None  # not paused any more


async def test_skipping_the_last_message_leaves_an_idle_instance_that_a_send_wakes(
    backend: Backend, raw: Redis
) -> None:
    dead_id = await send(backend, ref())
    await backend.fail_turn(failure_of(await claim_one(backend)))
    assert await backend.resolve_dead_letter(ref(), skip=True) == dead_id
    info = await backend.message(APP, dead_id)
    assert info is not None and (info.status, info.error) == (MessageStatus.skipped, "RuntimeError: flaky")
    assert await raw.zcard("keel:ready:{loans}:loan") == 0
    assert await raw.llen("keel:inbox:{loans/loan/42}") == 0
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=5) == []
    later_id = await send(backend, ref())
    assert (await claim_one(backend)).message_id == later_id


# -- the schema step from layout 2 ----------------------------------------------------------------------------------


async def _write_layout_2(raw: Redis, prefix: str, *, paused: int, healthy: int) -> dict[str, str]:
    """What keel at schema 2 left: paused instances (failed head, one later message) and a pending one.

    Returns the failed message id of each paused instance's member.
    """
    await raw.hset(f"{prefix}schema", "store", "2")
    seq = 0
    failed: dict[str, str] = {}
    for n in range(paused + healthy):
        member = f"loans/loan/{n}"
        ids = [f"m{n}-a", f"m{n}-b"]
        await raw.rpush(f"{prefix}inbox:{{{member}}}", *ids)
        for message_id in ids:
            seq += 1
            message = f"{prefix}msg:{{{member}}}:{message_id}"
            await raw.hset(message, mapping={"p": "{}", "s": "pending", "n": "0", "q": str(seq), "i": member})
            await raw.hset(f"{prefix}msgindex:{{loans}}", message_id, member)
        if n < paused:
            await raw.hset(f"{prefix}inst:{{{member}}}", mapping={"tok": "1", "paused": "1"})
            await raw.hset(f"{prefix}msg:{{{member}}}:{ids[0]}", mapping={"s": "failed", "n": "1", "e": f"boom {n}"})
            turn = {
                "message_id": ids[0],
                "worker": "old:1",
                "attempt": 1,
                "fencing_token": 1,
                "version_read": 0,
                "version_written": None,
                "started_at_us": 1_700_000_000_000_000 + n * 1_000_000,
                "duration_s": 0.25,
                "outcome": "failed",
                "error": f"boom {n}",
            }
            await raw.lpush(f"{prefix}turns:{{{member}}}", json.dumps(turn))
            failed[member] = ids[0]
        else:
            await raw.hset(f"{prefix}inst:{{{member}}}", "tok", "0")
            await raw.zadd(f"{prefix}ready:{{loans}}:loan", {member: seq - 1})
    await raw.set(f"{prefix}seq:{{loans}}", seq)
    return failed


@pytest.mark.parametrize("prefix", ["keel:", "we*rd[1]?:"])
async def test_the_schema_step_indexes_the_dead_letters_of_a_layout_2_database(
    redis_url: str, raw: Redis, prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrate, "SCAN_COUNT", 2)  # several SCAN batches, so several upgrade scripts
    failed = await _write_layout_2(raw, prefix, paused=5, healthy=2)
    await raw.hset("keel-unrelated:inst:{loans/loan/9}", mapping={"tok": "1", "paused": "1"})
    url = prefixed_url(redis_url, prefix)
    with caplog.at_level(logging.INFO, logger=MIGRATE_LOGGER):
        opened = await open_backend(url, StoreOptions())
    try:
        assert await raw.hget(f"{prefix}schema", "store") == str(STORE_SCHEMA_VERSION) == "7"
        assert any("5 dead letter(s) indexed" in r.getMessage() for r in caplog.records)
        letters = await opened.dead_letters(APP, limit=10)
        assert [d.message_id for d in letters] == [failed[f"loans/loan/{n}"] for n in (4, 3, 2, 1, 0)]
        first = letters[-1]
        assert (first.instance, first.error, first.attempts) == (ref("0"), "boom 0", 1)
        assert first.failed_at == datetime.fromtimestamp(1_700_000_000, UTC) + timedelta(seconds=0.25)
        upgraded = await snapshot(raw)
        keys = RedisKeys(prefix)
        await upgrade_layout(raw, keys, 2, url=url)  # idempotent: a second run, as a racing process's, changes nothing
        assert await snapshot(raw) == upgraded
        assert not await raw.exists("keel-unrelated:dead:{loans}")
        # The upgraded data runs on: healthy instances are claimed, and a resolved letter's instance goes on.
        assert await opened.resolve_dead_letter(ref("0"), skip=True) == "m0-a"
        claims = await opened.claim(APP, ["loan"], worker="w1", lease_s=5, limit=10)
        assert sorted(c.message_id for c in claims) == ["m0-b", "m5-a", "m6-a"]
    finally:
        await opened.aclose()
    before = await snapshot(raw)
    await reopen(url)  # at schema 4 already: no upgrade runs
    assert await snapshot(raw) == before

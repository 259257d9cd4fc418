"""Redis-only behaviour of timers, pruning and deletion: the inbox and ready scores, the order of ties, the prune
indexes and their batches, and what a deleted instance leaves behind. What every engine shares is in
tests/conformance/."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, cast

import pytest

import keel
from keel.backends.base import Pruned
from keel.backends.redis import cleanup
from tests._engine import APP, claim_all, commit_of, failure_of, ref, send, step_of
from tests.backends.redis._support import EPOCH, micros, server_now_us, snapshot

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from keel.backends.base import Backend, InstanceRef

pytestmark = pytest.mark.redis

#: What a failed turn of these tests reports.
BOOM = "RuntimeError: boom"


# -- timers ---------------------------------------------------------------------------------------------------------


async def test_a_timer_is_scored_by_its_visible_time_on_the_server_clock(backend: Backend, raw: Redis) -> None:
    before = await server_now_us(raw)
    timer = await send(backend, ref(), {}, delay_s=60)
    after = await server_now_us(raw)
    message = await raw.hgetall(f"keel:msg:{{loans/loan/42}}:{timer}")
    sent_at, visible_at = int(message["a"]), int(message["r"])
    assert before <= sent_at <= after and visible_at == sent_at + 60_000_000
    assert await raw.zrange("keel:inbox:{loans/loan/42}", 0, -1, withscores=True) == [
        (f"{1:016d}:{timer}", float(visible_at))
    ]
    assert await raw.zrange("keel:ready:{loans}:loan", 0, -1, withscores=True) == [("loans/loan/42", visible_at)]
    assert await claim_all(backend) == []  # in the ready set, but not due
    now_id = await send(backend, ref(), {})  # an undelayed message goes first, and rescores the instance
    now_visible = float(await raw.hget(f"keel:msg:{{loans/loan/42}}:{now_id}", "r") or 0)
    assert await raw.zscore("keel:ready:{loans}:loan", "loans/loan/42") == now_visible
    [claim] = await claim_all(backend)
    assert claim.message_id == now_id
    await backend.commit_turn(commit_of(claim, {"by": claim.message_id}))
    assert await raw.zscore("keel:ready:{loans}:loan", "loans/loan/42") == visible_at  # the timer is next again


async def test_equal_visible_times_are_claimed_in_send_order_past_the_limit(backend: Backend, raw: Redis) -> None:
    # Three instances whose next messages became visible at the same microsecond: the set orders them by name
    # (a, m, z), the claim by sequence number (z, m, a), even when it asks for fewer than are tied.
    ids = {name: await send(backend, ref(name), {}) for name in ("z", "m", "a")}
    same = await server_now_us(raw) - 1_000_000
    for seq, (name, message_id) in enumerate(ids.items(), start=1):
        await raw.zadd(f"keel:inbox:{{loans/loan/{name}}}", {f"{seq:016d}:{message_id}": same})
        await raw.zadd("keel:ready:{loans}:loan", {f"loans/loan/{name}": same})
    assert [c.instance.workflow_id for c in await claim_all(backend, limit=1)] == ["z"]
    assert [c.instance.workflow_id for c in await claim_all(backend, limit=2)] == ["m", "a"]


async def test_a_negative_delay_is_no_delay(backend: Backend, raw: Redis) -> None:
    message_id = await send(backend, ref(), {}, delay_s=-5)
    fields = await raw.hmget(f"keel:msg:{{loans/loan/42}}:{message_id}", ["a", "r"])
    assert fields[0] == fields[1]
    assert [c.message_id for c in await claim_all(backend)] == [message_id]


# -- prune ----------------------------------------------------------------------------------------------------------


async def _finish(backend: Backend, count: int, *, instance: InstanceRef, key_prefix: str | None = None) -> list[str]:
    """Send ``count`` messages to ``instance`` and commit each, recording a step on the way."""
    done: list[str] = []
    for n in range(count):
        await send(backend, instance, {}, key=None if key_prefix is None else f"{key_prefix}{n}")
        [claim] = await claim_all(backend, limit=1)
        await backend.record_step(step_of(claim, "s", 1))
        await backend.commit_turn(commit_of(claim, {"by": claim.message_id}))
        done.append(claim.message_id)
    return done


async def test_prune_goes_through_its_indexes_in_batches(
    backend: Backend, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cleanup, "PRUNE_BATCH", 2)
    plain = await _finish(backend, 3, instance=ref("a"))
    keyed = await _finish(backend, 4, instance=ref("b"), key_prefix="k")
    await send(backend, ref("a"), {})  # pending: never pruned
    assert await raw.zcard("keel:finished:{loans}") == 3 and await raw.zcard("keel:finkeyed:{loans}") == 4
    # The first three keyed messages were sent an hour ago and are recently finished; the fourth is old on
    # both counts. With batches of 2 the prune must step over the three it keeps to reach the fourth.
    now = await server_now_us(raw)
    for n, message_id in enumerate(keyed):
        sent = now - 3_600_000_000 + n
        await raw.hset(f"keel:msg:{{loans/loan/b}}:{message_id}", "a", str(sent))
        await raw.zadd("keel:finkeyed:{loans}", {message_id: sent})
    await raw.hset(f"keel:msg:{{loans/loan/b}}:{keyed[3]}", "x", str(now - 3_000_000_000))
    cut = EPOCH + timedelta(microseconds=now - 60_000_000)
    pruned = await backend.prune(APP, finished_before=cut, keys_before=cut - timedelta(minutes=30))
    assert pruned == Pruned(messages=1, turns=0)  # the plain ones and the turns finished after the cut
    assert await backend.message(APP, keyed[3]) is None
    assert await raw.hgetall("keel:idem:{loans/loan/b}") == {f"k{n}": keyed[n] for n in range(3)}
    assert await raw.smembers("keel:ids:{loans/loan/b}") == set(keyed[:3])
    assert not await raw.exists(f"keel:steps:{{loans/loan/b}}:{keyed[3]}")

    later = datetime.now(UTC) + timedelta(seconds=5)
    pruned = await backend.prune(APP, finished_before=later, keys_before=later)
    assert pruned == Pruned(messages=6, turns=7)
    for message_id in plain + keyed:
        assert await backend.message(APP, message_id) is None
    assert not await raw.keys("keel:steps:*")
    assert await raw.scard("keel:ids:{loans/loan/a}") == 1  # the pending one
    for gone in ("finished", "finkeyed", "turnidx"):
        assert not await raw.exists(f"keel:{gone}:{{loans}}")
    assert await raw.hlen("keel:msgindex:{loans}") == 1
    assert len(await claim_all(backend)) == 1
    assert await backend.prune(APP, finished_before=later, keys_before=later) == Pruned(0, 0)


async def test_prune_trims_turn_lists_from_their_oldest_end(
    backend: Backend, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cleanup, "PRUNE_BATCH", 2)
    await send(backend, ref(), {})
    for _ in range(4):
        [claim] = await claim_all(backend)
        await backend.release(claim)
        [claim] = await claim_all(backend)
        await backend.retry_turn(failure_of(claim, BOOM), delay_s=0)
    turns = await backend.turns(ref(), limit=10)
    assert len(turns) == 4
    oldest = float(micros(turns[-1].started_at))
    assert await raw.zrange("keel:turnidx:{loans}", 0, -1, withscores=True) == [("loans/loan/42", oldest)]
    cut = turns[0].started_at  # all but the newest started before it
    assert await backend.prune(APP, finished_before=cut, keys_before=cut) == Pruned(messages=0, turns=3)
    assert await backend.turns(ref(), limit=10) == turns[:1]
    newest = float(micros(turns[0].started_at))
    assert await raw.zrange("keel:turnidx:{loans}", 0, -1, withscores=True) == [("loans/loan/42", newest)]


async def test_the_turn_index_follows_the_trimmed_list(
    backend: Backend, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keel.backends.redis import broker as redis_broker

    monkeypatch.setattr(redis_broker, "TURNS_LIMIT", 2)
    await _finish(backend, 3, instance=ref())
    turns = await backend.turns(ref(), limit=10)
    assert len(turns) == 2
    oldest = float(micros(turns[-1].started_at))
    assert await raw.zscore("keel:turnidx:{loans}", "loans/loan/42") == oldest


# -- delete ---------------------------------------------------------------------------------------------------------


async def test_delete_leaves_nothing_of_the_instance_and_fences_its_claims(backend: Backend, raw: Redis) -> None:
    await _finish(backend, 1, instance=ref("kept"), key_prefix="k")
    empty = await snapshot(raw)
    await _finish(backend, 2, instance=ref("gone"), key_prefix="k")
    await send(backend, ref("gone"), {}, delay_s=3600)
    await send(backend, ref("gone"), {})
    [held] = await claim_all(backend)
    await backend.record_step(step_of(held, "s", 1))
    assert await backend.delete_instance(ref("gone")) is True
    after = await snapshot(raw)
    assert after.pop("keel:tokfloor:{loans}") == ("string", -1, str(held.fencing_token))
    for name in ("keel:wake:{loans}", "keel:seq:{loans}"):
        after.pop(name)
        empty.pop(name)
    assert after == empty  # every key and set entry of "gone" went
    assert await backend.delete_instance(ref("gone")) is False

    before = await snapshot(raw)
    for refused in (
        backend.commit_turn(commit_of(held, {"by": held.message_id})),
        backend.fail_turn(failure_of(held, BOOM)),
        backend.retry_turn(failure_of(held, BOOM), delay_s=1),
        backend.record_step(step_of(held, "t", 2)),
    ):
        with pytest.raises(keel.LeaseLostError, match="the instance was deleted"):
            await refused
    assert await backend.renew([held], lease_s=5) == [False]
    await backend.release(held)
    assert await snapshot(raw) == before

    again = await send(backend, ref("gone"), {}, key="k0")  # a fresh instance: its keys went with the old one
    [claim] = await claim_all(backend)
    assert (claim.message_id, claim.state_version, claim.steps) == (again, 0, {})
    assert claim.fencing_token == held.fencing_token + 1  # above every token of the deleted instance
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.commit_turn(commit_of(held, {"by": held.message_id}))


async def test_deleting_a_paused_or_held_instance_clears_the_app_sets(backend: Backend, raw: Redis) -> None:
    await send(backend, ref("dead"), {})
    await send(backend, ref("held"), {})
    for claim in await claim_all(backend):
        if claim.instance == ref("dead"):
            await backend.fail_turn(failure_of(claim, BOOM))
        else:
            await backend.retry_turn(failure_of(claim, BOOM), delay_s=60)
    assert await raw.zcard("keel:dead:{loans}") == 1 and await raw.zcard("keel:leased:{loans}:loan") == 1
    assert await backend.delete_instance(ref("dead")) is True
    assert await backend.delete_instance(ref("held")) is True
    assert await backend.dead_letters(APP, limit=5) == []
    assert sorted(cast("list[str]", await raw.keys("*"))) == [
        "keel:schema",
        "keel:seq:{loans}",
        "keel:tokfloor:{loans}",
        "keel:wake:{loans}",
    ]

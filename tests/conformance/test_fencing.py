"""Fencing (G2), on every engine: a claim that is no longer the instance's writes nothing, whatever it tries.

A claim stops being current when its instance is deleted, when it commits, fails, retries or releases, when its
lease expires, or when a newer claim takes over; from then on commit, fail, retry and step records raise
``LeaseLostError`` and renew reports False. Fencing tokens are monotonic per instance, across deletes too.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import pytest

import keel
from tests._engine import (
    APP,
    claim_all,
    claim_one,
    commit_of,
    failure_of,
    ref,
    send,
    step_of,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from keel.backends.base import Backend, Claim


def stale_writes(backend: Backend, claim: Claim) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    """Every write a worker may attempt under ``claim``, each to be refused."""
    return [
        ("commit", lambda: backend.commit_turn(commit_of(claim, {"by": "stale"}))),
        ("fail", lambda: backend.fail_turn(failure_of(claim))),
        ("retry", lambda: backend.retry_turn(failure_of(claim), delay_s=0)),
        ("step", lambda: backend.record_step(step_of(claim, "late"))),
    ]


async def assert_all_refused(backend: Backend, claim: Claim, match: str | None) -> None:
    """Each of ``stale_writes`` raises LeaseLostError for ``claim`` (its reason matching ``match``); renew is False."""
    for name, write in stale_writes(backend, claim):
        with pytest.raises(keel.LeaseLostError, match=match) as caught:
            await write()
        assert caught.value.fencing_token == claim.fencing_token, name
    assert await backend.renew([claim], lease_s=5) == [False]


async def visible(backend: Backend) -> tuple[object, ...]:
    """What a client can read of instance ``ref()``: compare two readings to see that nothing was written."""
    state = await backend.state(ref())
    turns = await backend.turns(ref(), limit=50)
    dead = await backend.dead_letters(APP, limit=50)
    return (state, turns, dead, await backend.events(APP, limit=50))


async def test_tokens_never_repeat_after_a_delete_and_a_stale_claim_writes_nothing(
    backend: Backend, other: Backend
) -> None:
    await send(backend, ref())
    first = await claim_one(backend)
    await backend.record_step(step_of(first, "charge"))
    await backend.commit_turn(commit_of(first, {"n": 1}))
    await send(backend, ref(), delay_s=3600)
    await send(backend, ref())
    held = await claim_one(backend)
    await backend.record_step(step_of(held, "charge"))
    assert await other.delete_instance(ref()) is True  # by another worker, while this one holds the lease
    assert await backend.delete_instance(ref()) is False  # already gone

    await assert_all_refused(backend, held, "the instance was deleted")
    await backend.release(held)  # harmless
    assert (await backend.state(ref()), await backend.turns(ref(), limit=5)) == (None, [])
    assert await claim_all(backend) == []  # the timer went with it

    await send(other, ref())  # started afresh before the stale worker tries anything else
    await assert_all_refused(backend, held, None)  # the reason given differs: deleted (postgres), released
    assert await backend.state(ref()) is None
    fresh = await claim_one(other)
    assert (fresh.state_json, fresh.state_version, fresh.attempt, dict(fresh.steps)) == (None, 0, 1, {})
    assert fresh.fencing_token == held.fencing_token + 1  # above every token of the deleted instance
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.commit_turn(commit_of(held, {"by": "stale"}))
    assert await other.commit_turn(commit_of(fresh, {"n": 1})) == 1
    state = await backend.state(ref())
    assert state is not None and (json.loads(state.value_json or "null"), state.version) == ({"n": 1}, 1)

    assert await backend.delete_instance(ref()) is True  # a second delete keeps the floor too
    await send(backend, ref())
    assert (await claim_one(backend)).fencing_token == fresh.fencing_token + 1


@pytest.mark.parametrize("let_go", ["commit", "release", "retry", "fail"])
async def test_a_claim_let_go_is_told_its_lease_was_released_and_writes_nothing(backend: Backend, let_go: str) -> None:
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
    before = await visible(backend)
    info = await backend.message(APP, claim.message_id)
    await assert_all_refused(backend, claim, "the lease was released")
    assert await visible(backend) == before
    assert await backend.message(APP, claim.message_id) == info


async def test_refused_steps_and_retries_write_nothing(backend: Backend) -> None:
    message_id = await send(backend, ref())
    released = await claim_one(backend)
    await backend.release(released)
    expired = await claim_one(backend, lease_s=0.2)
    await asyncio.sleep(0.3)
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.record_step(step_of(released, "pay"))
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.record_step(step_of(expired, "pay"))
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.retry_turn(failure_of(expired), delay_s=30)
    assert await backend.turns(ref(), limit=5) == []
    again = await claim_one(backend)  # not held for 30 s, and no step was kept
    assert (again.message_id, again.attempt, dict(again.steps)) == (message_id, 3, {})
    info = await backend.message(APP, message_id)
    assert info is not None and info.status.value == "pending"


async def test_a_retried_claim_is_released_and_its_hold_outlasts_sends_and_releases(
    backend: Backend, other: Backend
) -> None:
    first_id = await send(backend, ref())
    claim = await claim_one(backend)
    await backend.retry_turn(failure_of(claim), delay_s=0.8)
    for refused in (backend.record_step(step_of(claim, "x")), backend.retry_turn(failure_of(claim), delay_s=0)):
        with pytest.raises(keel.LeaseLostError, match="released"):
            await refused
    assert await backend.renew([claim], lease_s=5) == [False]
    await backend.release(claim)  # a hold is not a lease: releasing the retried claim does not end it
    await send(other, ref())  # nor does a send during the hold
    assert await claim_all(other, worker="w2") == []
    await asyncio.sleep(1.0)
    again = await claim_one(other, worker="w2")
    assert (again.message_id, again.attempt, again.fencing_token) == (first_id, 2, claim.fencing_token + 1)


async def test_concurrent_records_of_one_step_keep_one_result(backend: Backend, other: Backend) -> None:
    await send(backend, ref())
    claim = await claim_one(backend)
    await asyncio.gather(
        *((backend if n % 2 else other).record_step(step_of(claim, "pay", {"n": n})) for n in range(10))
    )
    await backend.release(claim)
    steps = (await claim_one(other)).steps
    assert list(steps) == ["pay"] and json.loads(steps["pay"])["n"] in range(10)


async def test_an_expired_lease_is_taken_over_in_the_order_of_its_message(backend: Backend) -> None:
    await send(backend, ref("old"))
    await send(backend, ref("new"))
    zombie = await claim_one(backend, lease_s=0.1)
    assert zombie.instance == ref("old")
    await asyncio.sleep(0.2)
    claims = await backend.claim(APP, ["loan"], worker="w2", lease_s=5, limit=2)
    assert [(c.instance.workflow_id, c.attempt) for c in claims] == [("old", 2), ("new", 1)]
    assert claims[0].fencing_token == zombie.fencing_token + 1
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.commit_turn(commit_of(zombie))

"""Inboxes through several backends, order, dead letters and durability, on every engine (G2, G6).

A second backend on the same database stands for another process: its own connections, the same data.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends.base import InstanceRef, MessageStatus, NewMessage, Pruned
from tests._engine import (
    APP,
    FLAKY,
    claim_all,
    claim_one,
    commit_of,
    failure_of,
    opened,
    ref,
    send,
    step_of,
)

if TYPE_CHECKING:
    from keel.backends.base import Backend, Claim


# --- Several backends at once --------------------------------------------------------------------------------


async def test_one_idempotency_key_sent_through_several_backends_appends_once(backend: Backend, other: Backend) -> None:
    ids = await asyncio.gather(
        *(
            (backend if n % 2 else other).send(NewMessage(ref(), f"m-{n}", "{}", idempotency_key="req-1"))
            for n in range(12)
        )
    )
    assert len(set(ids)) == 1
    claimed = await claim_all(backend)
    assert [c.message_id for c in claimed] == ids[:1]
    await backend.commit_turn(commit_of(claimed[0]))
    assert await claim_all(other) == []


async def test_claims_through_several_backends_never_share_an_instance(backend: Backend, other: Backend) -> None:
    for n in range(40):
        await send(backend, ref(str(n)), {"n": n})
    batches = await asyncio.gather(
        *((backend if i % 2 else other).claim(APP, ["loan"], worker=f"w{i}", lease_s=30, limit=3) for i in range(20))
    )
    claimed = [c.instance for batch in batches for c in batch]
    assert len(claimed) == len(set(claimed)) == 40
    assert await other.claim(APP, ["loan"], worker="late", lease_s=30, limit=5) == []


async def test_workers_on_two_backends_run_every_message_once_in_send_order(backend: Backend, other: Backend) -> None:
    instances = [ref(str(n)) for n in range(20)]
    sent: dict[InstanceRef, list[str]] = {inst: [] for inst in instances}
    held: set[InstanceRef] = set()
    committed: list[tuple[InstanceRef, str]] = []

    async def sender() -> None:
        for round_ in range(3):
            for inst in instances:
                sent[inst].append(await send(backend if round_ % 2 else other, inst, {"round": round_}))

    async def worker(engine: Backend, name: str) -> None:
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 0.5:
            claims = await engine.claim(APP, ["loan"], worker=name, lease_s=30, limit=3)
            if not claims:
                await asyncio.sleep(0.01)
                continue
            idle_since = time.monotonic()
            for claim in claims:
                assert claim.instance not in held, f"{claim.instance} claimed while leased"
                held.add(claim.instance)
            await asyncio.sleep(0.005)  # a turn
            for claim in claims:
                held.discard(claim.instance)
                await engine.commit_turn(commit_of(claim, {"n": claim.state_version + 1}, worker=name))
                committed.append((claim.instance, claim.message_id))

    engines = (("a", backend), ("b", other))
    await asyncio.gather(sender(), *(worker(engine, f"{name}-{i}") for name, engine in engines for i in range(3)))
    assert sorted(m for _, m in committed) == sorted(m for ids in sent.values() for m in ids)
    for inst in instances:
        assert [m for i, m in committed if i == inst] == sent[inst]  # each inbox ran in send order
        state = await backend.state(inst)
        assert state is not None and state.version == 3
        turns = await backend.turns(inst, limit=10)
        assert [t.attempt for t in turns] == [1, 1, 1]
        tokens = [t.fencing_token for t in reversed(turns)]
        assert tokens == sorted(set(tokens))


async def test_everything_survives_closing_and_reopening(backend_url: str) -> None:
    async with opened(backend_url) as first:
        done = await send(first, ref())
        waiting = await send(first, ref())
        claim = await claim_one(first)
        await first.commit_turn(commit_of(claim, {"n": 1}))
        await send(first, ref("b", workflow="chat"), message_id="m-b")
        stepped = await claim_one(first, ("chat",), lease_s=0.2)
        await first.record_step(step_of(stepped, "charge", {"id": "ch_1"}))
    await asyncio.sleep(0.3)  # the first worker's lease on b runs out
    async with opened(backend_url) as second:
        state = await second.state(ref())
        assert state is not None and (state.value_json, state.version) == ('{"n": 1}', 1)
        info = await second.message(APP, done)
        assert info is not None and (info.status, info.state_version) == (MessageStatus.done, 1)
        claims = {
            c.instance.workflow_id: c
            for c in await second.claim(APP, ["loan", "chat"], worker="w2", lease_s=5, limit=5)
        }
        again = claims["42"]
        assert (again.message_id, again.state_version, again.fencing_token) == (waiting, 1, claim.fencing_token + 1)
        assert (claims["b"].message_id, claims["b"].attempt) == ("m-b", 2)
        assert dict(claims["b"].steps) == {"charge": '{"id": "ch_1"}'}


async def test_a_closed_backend_refuses_calls_and_closes_twice(backend_url: str) -> None:
    async with opened(backend_url) as backend:
        await send(backend, ref())
        await backend.store.aclose()  # the store shares the backend's connections: closing it closes nothing twice
    with pytest.raises(keel.BackendUnavailable, match="closed"):
        await backend.claim(APP, ["loan"], worker="w1", lease_s=5, limit=1)
    await backend.aclose()  # a second time


# --- Order -----------------------------------------------------------------------------------------------------


async def test_instances_are_claimed_in_the_order_their_next_messages_become_visible(backend: Backend) -> None:
    await send(backend, ref("late"), delay_s=0.4)
    await send(backend, ref("now"))
    await send(backend, ref("soon"), delay_s=0.2)
    assert [c.instance.workflow_id for c in await claim_all(backend)] == ["now"]
    await asyncio.sleep(0.5)
    assert [c.instance.workflow_id for c in await claim_all(backend)] == ["soon", "late"]


async def test_a_retry_with_no_delay_is_claimable_at_once_and_keeps_its_place(backend: Backend) -> None:
    message_id = await send(backend, ref())
    await send(backend, ref("later"))
    await backend.retry_turn(failure_of(await claim_one(backend)), delay_s=0)
    claims = await claim_all(backend, limit=2)
    assert (claims[0].message_id, claims[0].attempt) == (message_id, 2)  # still the oldest message


async def test_a_retried_or_resolved_delayed_message_keeps_its_place(backend: Backend) -> None:
    timer = await send(backend, ref(), delay_s=0.2)
    await asyncio.sleep(0.3)
    claim = await claim_one(backend)
    assert claim.message_id == timer
    later = await send(backend, ref())
    await backend.retry_turn(failure_of(claim), delay_s=0)
    again = await claim_one(backend)
    assert (again.message_id, again.attempt) == (timer, 2)
    await backend.fail_turn(failure_of(again))
    assert await backend.resolve_dead_letter(ref(), skip=False) == timer
    assert (await claim_one(backend)).message_id == timer
    info = await backend.message(APP, later)
    assert info is not None and info.status is MessageStatus.pending


async def test_a_retried_message_keeps_its_place_before_a_timer_due_during_the_hold(backend: Backend) -> None:
    timer = await send(backend, ref(), delay_s=0.3)
    first = await send(backend, ref())
    claim = await claim_one(backend)
    assert claim.message_id == first
    await backend.retry_turn(failure_of(claim), delay_s=0.6)
    await asyncio.sleep(0.4)
    assert await claim_all(backend) == []  # the timer is due, but the instance is held
    await asyncio.sleep(0.4)
    again = await claim_one(backend)
    assert (again.message_id, again.attempt) == (first, 2)
    await backend.commit_turn(commit_of(again))
    assert [c.message_id for c in await claim_all(backend)] == [timer]


async def test_a_message_sent_while_paused_waits_behind_the_dead_letter(backend: Backend) -> None:
    dead = await send(backend, ref())
    await backend.fail_turn(failure_of(await claim_one(backend)))
    later = await send(backend, ref())
    assert await claim_all(backend) == []
    assert await backend.resolve_dead_letter(ref(), skip=False) == dead
    retried = await claim_one(backend)
    assert retried.message_id == dead
    await backend.commit_turn(commit_of(retried))
    assert (await claim_one(backend)).message_id == later


# --- Dead letters ----------------------------------------------------------------------------------------------


async def test_dead_letters_come_newest_first_across_instances_with_when_they_failed(backend: Backend) -> None:
    ids = [await send(backend, ref(str(n))) for n in range(3)]
    before = datetime.now(UTC) - timedelta(seconds=5)  # engines' clocks; the margin is for the server's
    for n in range(3):
        await backend.fail_turn(failure_of(await claim_one(backend), f"boom {n}"))
        await asyncio.sleep(0.01)
    letters = await backend.dead_letters(APP, limit=10)
    assert [d.message_id for d in letters] == ids[::-1]
    assert [(d.error, d.attempts) for d in letters] == [("boom 2", 1), ("boom 1", 1), ("boom 0", 1)]
    assert all(before <= d.failed_at <= datetime.now(UTC) + timedelta(seconds=5) for d in letters)
    assert letters[0].failed_at >= letters[1].failed_at >= letters[2].failed_at
    assert [d.message_id for d in await backend.dead_letters(APP, limit=2)] == ids[:0:-1]
    assert await backend.dead_letters(APP, limit=0) == []


async def test_a_retried_dead_letter_starts_clean_but_keeps_its_steps_and_state(backend: Backend) -> None:
    await send(backend, ref())
    assert await backend.commit_turn(commit_of(await claim_one(backend), {"n": 1})) == 1
    dead_id = await send(backend, ref())
    await send(backend, ref())
    claim = await claim_one(backend)
    await backend.record_step(step_of(claim, "charge", {"id": "ch_1"}))
    await backend.fail_turn(failure_of(claim))
    assert await backend.resolve_dead_letter(ref(), skip=False) == dead_id
    info = await backend.message(APP, dead_id)
    assert info is not None and (info.status, info.error) == (MessageStatus.pending, None)
    assert await backend.dead_letters(APP, limit=5) == []
    assert await backend.resolve_dead_letter(ref(), skip=False) is None  # not paused any more
    again = await claim_one(backend)
    assert (again.message_id, again.attempt, dict(again.steps)) == (dead_id, 1, {"charge": '{"id": "ch_1"}'})
    assert (again.state_version, again.state_json) == (1, '{"n": 1}')
    assert await backend.commit_turn(commit_of(again, {"n": 2})) == 2


async def test_skipping_the_last_message_leaves_an_empty_inbox_that_a_send_refills(backend: Backend) -> None:
    dead_id = await send(backend, ref())
    await backend.fail_turn(failure_of(await claim_one(backend)))
    assert await backend.resolve_dead_letter(ref(), skip=True) == dead_id
    info = await backend.message(APP, dead_id)
    assert info is not None and (info.status, info.error) == (MessageStatus.skipped, FLAKY)
    assert await claim_all(backend) == []
    assert await backend.resolve_dead_letter(ref(), skip=True) is None  # no longer paused
    later_id = await send(backend, ref())
    assert (await claim_one(backend)).message_id == later_id


async def test_concurrent_resolves_resolve_once(backend: Backend, other: Backend) -> None:
    dead_id = await send(backend, ref())
    later_id = await send(backend, ref())
    await backend.fail_turn(failure_of(await claim_one(backend)))
    results = await asyncio.gather(
        *((backend if n % 2 else other).resolve_dead_letter(ref(), skip=True) for n in range(6))
    )
    assert [r for r in results if r is not None] == [dead_id]
    assert (await claim_one(backend)).message_id == later_id  # skipped once: the later message is not skipped


async def test_deleting_a_paused_or_held_instance_frees_it_and_its_dead_letter(backend: Backend) -> None:
    await send(backend, ref("dead"))
    await send(backend, ref("held"))
    for claim in await claim_all(backend):
        if claim.instance == ref("dead"):
            await backend.fail_turn(failure_of(claim))
        else:
            await backend.retry_turn(failure_of(claim), delay_s=60)
    assert len(await backend.dead_letters(APP, limit=5)) == 1
    assert await backend.delete_instance(ref("dead")) is True
    assert await backend.delete_instance(ref("held")) is True
    assert await backend.dead_letters(APP, limit=5) == []
    assert await backend.resolve_dead_letter(ref("dead"), skip=True) is None
    await send(backend, ref("dead"))
    await send(backend, ref("held"))
    claims: list[Claim] = await claim_all(backend)
    assert sorted((c.instance.workflow_id, c.state_version, c.attempt) for c in claims) == [
        ("dead", 0, 1),
        ("held", 0, 1),
    ]  # neither paused nor held any more


# --- Sends in a commit, and prune -----------------------------------------------------------------------------


async def test_a_commit_may_send_to_its_own_instance(backend: Backend) -> None:
    await send(backend, ref())
    claim = await claim_one(backend)
    again, elsewhere = NewMessage(ref(), "again", "{}"), NewMessage(ref("0"), "elsewhere", "{}")
    assert await backend.commit_turn(commit_of(claim, {"n": 1}, sends=(again, elsewhere))) == 1
    assert {c.message_id for c in await claim_all(backend)} == {"again", "elsewhere"}


async def test_prune_keeps_the_steps_of_messages_it_keeps_and_only_touches_its_app(backend: Backend) -> None:
    await send(backend, ref("a"))
    done = await claim_one(backend)
    await backend.record_step(step_of(done, "charge"))
    await backend.commit_turn(commit_of(done))
    await send(backend, ref("b"))
    held = await claim_one(backend)
    await backend.record_step(step_of(held, "charge", {"kept": True}))
    soon = datetime.now(UTC) + timedelta(seconds=5)
    assert await backend.prune("other-app", finished_before=soon, keys_before=soon) == Pruned()
    assert await backend.prune(APP, finished_before=soon, keys_before=soon) == Pruned(messages=1, turns=1)
    await backend.release(held)
    assert dict((await claim_one(backend)).steps) == {"charge": json.dumps({"kept": True})}


async def test_turn_records_come_newest_first_and_honour_the_limit(backend: Backend) -> None:
    ids = [await send(backend, ref()) for _ in range(3)]
    for _ in ids:
        await backend.commit_turn(commit_of(await claim_one(backend)))
    turns = await backend.turns(ref(), limit=10)
    assert [t.message_id for t in turns] == ids[::-1]
    assert [t.version_written for t in turns] == [3, 2, 1]
    assert [t.message_id for t in await backend.turns(ref(), limit=2)] == ids[:0:-1]
    assert await backend.turns(ref("never-seen"), limit=5) == []

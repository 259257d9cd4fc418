"""Concurrent fenced writes of one backend, on every engine: each stands or falls alone (group commit).

Engines may write the commits and step records that wait at the same time in one transaction or script (SQLite,
PostgreSQL and Redis do). That must stay invisible: each write is fenced on its own, so a stale claim among live
ones is refused alone, and every caller answered after the commit finds its write durable (readable from another
backend at once).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import keel
from tests._engine import claim_all, commit_of, new_message, ref, send, step_of

if TYPE_CHECKING:
    from keel.backends.base import Backend


async def test_concurrent_commits_and_steps_each_stand_or_fall_alone(backend: Backend, other: Backend) -> None:
    refs = [ref(str(n)) for n in range(8)]
    for instance in refs:
        await send(backend, instance)
    claims = await claim_all(backend, limit=len(refs))
    assert len(claims) == len(refs)
    stale = {claims[1].instance, claims[4].instance, claims[6].instance}
    for instance in stale:
        assert await other.delete_instance(instance) is True  # another process fences these claims out

    steps = await asyncio.gather(
        *(backend.record_step(step_of(c, "charge", n)) for n, c in enumerate(claims)), return_exceptions=True
    )
    commits = await asyncio.gather(
        *(backend.commit_turn(commit_of(c, {"n": n})) for n, c in enumerate(claims)), return_exceptions=True
    )

    for n, claim in enumerate(claims):
        if claim.instance in stale:
            for outcome in (steps[n], commits[n]):
                assert isinstance(outcome, keel.LeaseLostError), outcome
                assert outcome.fencing_token == claim.fencing_token
                assert "deleted" in outcome.reason
            assert await other.state(claim.instance) is None
            assert await other.turns(claim.instance, limit=5) == []
        else:
            assert steps[n] is None
            assert commits[n] == claim.state_version + 1
            state = await other.state(claim.instance)  # another backend sees it: committed, not only queued
            assert state is not None
            assert json.loads(state.value_json or "null") == {"n": n}
            [turn] = await other.turns(claim.instance, limit=5)
            assert turn.message_id == claim.message_id


async def test_a_commit_refused_for_its_version_does_not_hold_back_the_others(backend: Backend) -> None:
    refs = [ref(str(n)) for n in range(4)]
    for instance in refs:
        await send(backend, instance)
    claims = await claim_all(backend, limit=len(refs))
    first = await backend.commit_turn(commit_of(claims[0], {"n": 0}))
    assert first == 1
    outcomes = await asyncio.gather(
        backend.commit_turn(commit_of(claims[0], {"again": True})),  # its lease went with its commit
        *(backend.commit_turn(commit_of(c, {"n": n})) for n, c in enumerate(claims[1:], 1)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], keel.LeaseLostError)
    assert outcomes[1:] == [1, 1, 1]
    state = await backend.state(claims[0].instance)
    assert state is not None
    assert json.loads(state.value_json or "null") == {"n": 0}


async def test_a_caller_cancelled_while_its_commit_waits_does_not_stop_the_others(backend: Backend) -> None:
    refs = [ref(str(n)) for n in range(3)]
    for instance in refs:
        await send(backend, instance)
    claims = await claim_all(backend, limit=len(refs))
    tasks = [asyncio.create_task(backend.commit_turn(commit_of(c, {"n": n}))) for n, c in enumerate(claims)]
    await asyncio.sleep(0)  # every commit handed over; the first caller gives up (its commit may still happen)
    tasks[0].cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert outcomes[1:] == [1, 1]
    for claim in claims[1:]:
        assert await backend.state(claim.instance) is not None


async def test_concurrent_sends_each_stand_or_fall_alone(backend: Backend, other: Backend) -> None:
    # Engines may write the sends that wait at the same time together too; a conflict of one refuses that one only.
    first = await send(backend, ref("taken"), {"n": 0}, key="k")
    messages = [new_message(ref(str(n)), {"n": n}, key="k") for n in range(6)]
    messages.insert(3, new_message(ref("taken"), {"n": 1}, key="k"))  # the key holds another payload there
    messages.append(new_message(ref("taken"), {"n": 0}, key="k"))  # the same payload: the first id, nothing appended
    outcomes = await asyncio.gather(*(backend.send(m) for m in messages), return_exceptions=True)

    conflict = outcomes.pop(3)
    assert isinstance(conflict, keel.IdempotencyConflictError), conflict
    assert conflict.key == "k"
    assert outcomes.pop() == first
    assert outcomes == [m.message_id for m in messages[:3] + messages[4:7]]
    # Each was answered after its commit: another backend sees them at once, and "taken" holds only its first.
    claims = {c.instance.workflow_id: c for c in await claim_all(other, limit=20)}
    assert sorted(claims) == sorted([*map(str, range(6)), "taken"])
    for n in range(6):
        assert json.loads(claims[str(n)].payload_json) == {"n": n}
    assert claims["taken"].message_id == first
    await other.commit_turn(commit_of(claims["taken"], {}))
    assert await claim_all(other, limit=20) == []

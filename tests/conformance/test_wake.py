"""Waking idle workers, on every engine: ``wait_for_work`` returns soon after work may have come, and only then.

The worker's loop is claim, then wait when the claim found less than it asked for; so a wait must return at once
for work sent since the last claim began (else that work waits out the whole timeout), and need not return for
work the last claim already saw. Sends come through a second backend, as from another process.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from tests._engine import APP, claim_all, claim_one, failure_of, ref, send, timed_wait

if TYPE_CHECKING:
    from keel.backends.base import Backend


async def woken_after_send(waiter: Backend, sender: Backend, *, app: str = APP, workflow_id: str = "42") -> float:
    """Seconds from a send through ``sender`` to the return of a wait already parked on ``waiter``."""
    waiting = asyncio.create_task(waiter.wait_for_work(app, timeout_s=10))
    await asyncio.sleep(0.3)  # parked in its wait, whatever it subscribes to first
    assert not waiting.done()
    await send(sender, ref(workflow_id, app=app))
    sent = time.monotonic()
    await asyncio.wait_for(waiting, 10)
    return time.monotonic() - sent


async def test_a_send_from_another_backend_wakes_a_waiter_promptly(backend: Backend, other: Backend) -> None:
    assert await claim_all(backend) == []
    assert await woken_after_send(backend, other) < 0.3  # typically a few ms; the margin is for a loaded machine


async def test_a_send_through_the_same_backend_wakes_its_waiter_promptly(backend: Backend) -> None:
    assert await claim_all(backend) == []
    assert await woken_after_send(backend, backend) < 0.3


async def test_a_send_to_another_app_does_not_wake_a_waiter(backend: Backend, other: Backend) -> None:
    assert await claim_all(backend) == []
    waiting = asyncio.create_task(timed_wait(backend, 0.5))
    await asyncio.sleep(0.05)
    await send(other, ref(app="other-app"))
    assert await waiting >= 0.4


async def test_a_send_between_an_empty_claim_and_the_wait_is_not_slept_through(
    backend: Backend, other: Backend
) -> None:
    await timed_wait(backend, 0.2)  # it has waited before: whatever it listens with is up
    assert await claim_all(backend) == []
    await send(other, ref())  # while the worker would be busy between its claim and its wait
    await asyncio.sleep(0.3)
    assert await timed_wait(backend, 10) < 0.1  # its commit may have come after the claim's snapshot
    assert len(await claim_all(backend)) == 1


async def test_a_send_through_the_same_backend_between_claim_and_wait_is_not_slept_through(backend: Backend) -> None:
    assert await claim_all(backend) == []
    await send(backend, ref())
    assert await timed_wait(backend, 10) < 0.5


async def test_a_wait_with_no_claim_yet_returns_for_a_later_send(backend: Backend, other: Backend) -> None:
    assert await woken_after_send(backend, other) < 0.3


async def test_a_send_a_wait_woke_for_and_a_claim_took_does_not_wake_it_again(backend: Backend, other: Backend) -> None:
    assert await claim_all(backend) == []
    assert await woken_after_send(backend, other) < 0.3
    assert len(await claim_all(backend)) == 1
    assert await timed_wait(backend, 0.3) >= 0.25  # the send it woke for, claimed since, does not wake it again


async def test_work_under_another_workers_lease_does_not_wake_a_waiter(backend: Backend, other: Backend) -> None:
    await send(other, ref())
    await send(other, ref())
    assert len(await claim_all(other, worker="owner")) == 1
    assert await timed_wait(backend, 0.4) >= 0.3  # pending work it cannot take is no reason to spin
    assert await claim_all(backend, worker="idle") == []
    assert await timed_wait(backend, 0.4) >= 0.35


async def test_a_paused_or_held_instance_is_no_work_until_resolved(backend: Backend, other: Backend) -> None:
    await send(other, ref())
    await other.fail_turn(failure_of(await claim_one(other)))
    await send(other, ref("held"))
    [held] = await claim_all(other)
    await other.retry_turn(failure_of(held), delay_s=60)
    assert await claim_all(backend) == []
    waiting = asyncio.create_task(backend.wait_for_work(APP, timeout_s=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # neither instance is work
    await other.resolve_dead_letter(ref(), skip=False)
    resolved = time.monotonic()
    await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - resolved < 0.5  # a resolve wakes idle workers as a send does
    assert [c.instance for c in await claim_all(backend)] == [ref()]

"""``keel.backends.slots.FairSlots``: calls get their slot in arrival order, never overtaken, within their bound."""

from __future__ import annotations

import asyncio

import pytest

from keel.backends.slots import FairSlots, SlotTimeout


async def test_slots_go_to_waiters_in_arrival_order_even_when_a_holder_asks_again() -> None:
    slots = FairSlots(1, timeout_s=5)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with slots.slot():
            order.append("holder")
            await release.wait()
        # Straight back in line, as a caller looping send then wait does: it must come after those who waited.
        async with slots.slot():
            order.append("holder again")

    async def waiter(name: str) -> None:
        async with slots.slot():
            order.append(name)
            await asyncio.sleep(0)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(waiter(f"w{n}")) for n in range(5)]
    await asyncio.sleep(0.01)
    assert slots.queued == 5
    release.set()
    await asyncio.gather(first, *waiters)
    assert order == ["holder", "w0", "w1", "w2", "w3", "w4", "holder again"]
    assert slots.queued == 0


async def test_a_wait_past_the_bound_says_how_long_and_behind_how_many() -> None:
    slots = FairSlots(2, timeout_s=0.05)
    release = asyncio.Event()

    async def hold() -> None:
        async with slots.slot():
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0)
    late = [asyncio.create_task(hold()) for _ in range(3)]
    done, _ = await asyncio.wait(late, timeout=1)
    release.set()
    await asyncio.gather(*holders)
    errors = [task.exception() for task in done]
    assert all(isinstance(error, SlotTimeout) for error in errors)
    assert sorted(e.queued for e in errors if isinstance(e, SlotTimeout)) == [1, 2, 3]
    assert {(e.waited_s, e.size) for e in errors if isinstance(e, SlotTimeout)} == {(0.05, 2)}
    async with slots.slot(), slots.slot():  # every slot came back
        assert slots.queued == 0


async def test_a_waiter_cancelled_after_its_slot_was_handed_over_passes_it_on() -> None:
    slots = FairSlots(1, timeout_s=5)
    async with slots.slot():
        cancelled = asyncio.create_task(slots._take())
        next_in_line = asyncio.create_task(slots._take())
        await asyncio.sleep(0)
    # The slot was handed to `cancelled` as the block ended; cancel it before it runs.
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.wait_for(next_in_line, 1)  # it got the slot `cancelled` never used

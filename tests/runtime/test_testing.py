"""keel.testing: workflows unit-tested in process, through the same machinery a worker runs."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

import keel
from keel.testing import WorkflowTester


class Add(BaseModel):
    n: int


class Sum(BaseModel):
    total: int = 0
    doubled: int = 0


def make_app() -> keel.App:
    app = keel.App("testing-demo", retry=keel.RetryPolicy(max_attempts=1))

    async def double(n: int) -> int:
        return 2 * n

    @app.workflow(state=Sum, message=Add)
    async def adder(ctx: keel.TurnContext[Sum], msg: Add) -> None:
        if msg.n < 0:
            raise keel.NonRetryable("negative numbers are refused")
        ctx.state.total += msg.n
        ctx.state.doubled = await ctx.step("double", double, ctx.state.total)

    return app


async def test_run_sends_waits_and_returns_the_state() -> None:
    async with WorkflowTester(make_app()) as tester:
        first = await tester.run("adder", "a", Add(n=2))
        second = await tester.run("adder", "a", {"n": 3})
        assert (first.version, second.version) == (1, 2)
        assert second.value == Sum(total=5, doubled=10)
        assert await tester.state("adder", "b") is None


async def test_failures_surface_as_in_production() -> None:
    async with WorkflowTester(make_app()) as tester:
        with pytest.raises(keel.TurnFailedError, match="negative numbers"):
            await tester.run("adder", "a", Add(n=-1))
        [letter] = await tester.client.dead_letters()
        assert letter.instance.workflow_id == "a"
        with pytest.raises(keel.PayloadValidationError, match="n"):
            await tester.send("adder", "a", {"n": "many"})


async def test_each_tester_has_its_own_data() -> None:
    app = make_app()
    async with WorkflowTester(app) as tester:
        await tester.run("adder", "a", Add(n=1))
    async with WorkflowTester(app) as tester:
        assert await tester.state("adder", "a") is None


class Added(keel.Event):
    total: int


def make_event_app(seen: list[tuple[str, int]]) -> keel.App:
    app = keel.App("testing-events", retry=keel.RetryPolicy(max_attempts=1))

    @app.workflow(state=Sum, message=Add)
    async def adder(ctx: keel.TurnContext[Sum], msg: Add) -> None:
        ctx.state.total += msg.n
        ctx.emit(Added(total=ctx.state.total))

    @app.on(Added)
    async def record(event: Added, ctx: keel.HandlerContext) -> None:
        if event.total < 0:
            raise keel.NonRetryable("negative totals are refused")
        seen.append((ctx.idempotency_key, event.total))

    return app


async def test_deliver_publishes_and_waits_for_every_handler() -> None:
    seen: list[tuple[str, int]] = []
    async with WorkflowTester(make_event_app(seen)) as tester:
        event_id = await tester.deliver(Added(total=5))
        assert seen == [(f"record:{event_id}", 5)]
        await tester.run("adder", "a", Add(n=2))
        [emitted, published] = await tester.events()
        await tester.client.wait_event(emitted.event_id, timeout_s=5)
        assert (emitted.payload, published.event_id) == ({"total": 2}, event_id)
        assert seen[-1] == (f"record:{emitted.event_id}", 2)
        with pytest.raises(keel.TurnFailedError, match="negative totals are refused"):
            await tester.deliver(Added(total=-1))

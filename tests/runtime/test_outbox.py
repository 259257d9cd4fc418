"""The outbox of a turn: bad sends fail the turn at the call, for good, and queue nothing."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

import keel
from keel.testing import WorkflowTester


class Order(BaseModel):
    target: str = "ledger"
    key: str | None = None
    emit_plain_model: bool = False


class Seen(BaseModel):
    n: int = 0


class Placed(keel.Event):
    order_id: str


def make_app() -> keel.App:
    app = keel.App("outbox-tests", retry=keel.RetryPolicy(initial_delay_s=0.01, max_delay_s=0.02))

    @app.workflow(state=Seen, message=Order)
    async def order(ctx: keel.TurnContext[Seen], msg: Order) -> None:
        ctx.emit(Placed(order_id=ctx.workflow_id))
        if msg.emit_plain_model:
            ctx.emit(msg)  # type: ignore[arg-type]
        ctx.send(msg.target, ctx.workflow_id, Order(), idempotency_key=msg.key)
        ctx.state.n += 1

    @app.workflow(state=Seen, message=Order)
    async def ledger(ctx: keel.TurnContext[Seen], msg: Order) -> None:
        ctx.state.n += 1

    return app


@pytest.mark.parametrize(
    ("order", "error"),
    [
        (Order(target="nowhere"), "UnknownWorkflowError: app 'outbox-tests' has no workflow 'nowhere'"),
        (Order(key=""), "InvalidKeyError"),
        (Order(emit_plain_model=True), "TypeError: events must be instances of a keel.Event subclass"),
    ],
)
async def test_a_bad_send_or_emit_fails_the_turn_and_queues_nothing(order: Order, error: str) -> None:
    async with WorkflowTester(make_app()) as tester:
        message_id = await tester.send("order", "o1", order)
        with pytest.raises(keel.TurnFailedError) as failed:
            await tester.client.wait("order", "o1", message_id, timeout_s=30)
        assert error in failed.value.error
        [dead] = await tester.client.dead_letters()
        # A bad key or an unknown workflow fails the same way every time: dead-lettered at once, not retried.
        # (A TypeError from user code is retried like any other exception.)
        assert dead.attempts == (5 if "TypeError" in error else 1)
        assert await tester.events() == []  # the emit before the failing call was never published
        assert await tester.state("ledger", "o1") is None


async def test_a_good_outbox_is_committed_with_the_turn() -> None:
    async with WorkflowTester(make_app()) as tester:
        state = await tester.run("order", "o1", Order())
        assert state.value.n == 1
        [event] = await tester.events()
        assert event.type == "Placed"
        ledger = await tester.state("ledger", "o1")
        for _ in range(100):
            if ledger is not None:
                break
            await asyncio.sleep(0.02)
            ledger = await tester.state("ledger", "o1")
        assert ledger is not None
        assert ledger.value.n == 1

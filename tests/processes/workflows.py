"""The app that the process tests' `keel worker` subprocesses run (tests.processes.workflows:app)."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

import keel

app = keel.App("process-tests")


class Step(BaseModel):
    seq: int
    sleep_s: float = 0.0
    slow_first_attempt_s: float = 0.0
    fail: bool = False


class Progress(BaseModel):
    applied: list[int] = []
    workers: list[str] = []


@app.workflow(state=Progress, message=Step)
async def counter(ctx: keel.TurnContext[Progress], msg: Step) -> None:
    if msg.fail:
        raise keel.NonRetryable(f"step {msg.seq} was told to fail")
    if ctx.attempt == 1 and msg.slow_first_attempt_s:
        await asyncio.sleep(msg.slow_first_attempt_s)
    await asyncio.sleep(msg.sleep_s)
    ctx.state.applied.append(msg.seq)
    ctx.state.workers.append(ctx.worker)


class Charge(BaseModel):
    ledger: str
    pause_before_step_s: float = 0.0
    pause_after_step_s: float = 0.0


class Receipt(BaseModel):
    charged_by_token: int = 0
    attempts_seen: list[int] = []


def charge_card(ledger: str, token: int) -> int:
    """The outside world: appends a line per call, so a test can count how often the side effect ran."""
    with open(ledger, "a") as out:
        out.write(f"{token}\n")
    return token


@app.workflow(state=Receipt, message=Charge)
async def payment(ctx: keel.TurnContext[Receipt], msg: Charge) -> None:
    ctx.state.attempts_seen.append(ctx.attempt)
    if ctx.attempt == 1:
        await asyncio.sleep(msg.pause_before_step_s)
    ctx.state.charged_by_token = await ctx.step("charge", charge_card, msg.ledger, ctx.fencing_token)
    if ctx.attempt == 1:
        await asyncio.sleep(msg.pause_after_step_s)


# --- Events and handlers (issue #6) -------------------------------------------------------------------------


class Placed(keel.Event):
    order_id: str
    ledger: str
    #: The attempt of the turn that emitted it: a failed attempt's event must never reach a handler.
    emitted_by_attempt: int
    handler_sleep_s: float = 0.0


class Order(BaseModel):
    ledger: str
    handler_sleep_s: float = 0.0
    #: Fail the first attempt after emitting (retried: only the second attempt's event may be delivered).
    flaky_after_emit: bool = False
    #: Fail for good after emitting (dead-lettered: its event must never be delivered).
    fail_after_emit: bool = False


class OrderState(BaseModel):
    placed: int = 0


@app.workflow(state=OrderState, message=Order, retry=keel.RetryPolicy(initial_delay_s=0.2, max_delay_s=0.5))
async def order(ctx: keel.TurnContext[OrderState], msg: Order) -> None:
    ctx.emit(
        Placed(
            order_id=ctx.workflow_id,
            ledger=msg.ledger,
            emitted_by_attempt=ctx.attempt,
            handler_sleep_s=msg.handler_sleep_s,
        )
    )
    if msg.fail_after_emit:
        raise keel.NonRetryable("told to fail after emitting")
    if msg.flaky_after_emit and ctx.attempt == 1:
        raise RuntimeError("told to fail the first attempt after emitting")
    ctx.state.placed += 1


def append_line(path: str, line: str) -> None:
    """The outside world of the handlers: one line per effect, written with a single append."""
    with open(path, "a") as out:
        out.write(line + "\n")


@app.on(Placed)
async def confirm(event: Placed, ctx: keel.HandlerContext) -> None:
    await asyncio.sleep(event.handler_sleep_s)
    append_line(event.ledger, f"confirm {ctx.event_id} {ctx.idempotency_key} {ctx.worker} {event.emitted_by_attempt}")


@app.on(Placed)
async def bill(event: Placed, ctx: keel.HandlerContext) -> None:
    await asyncio.sleep(event.handler_sleep_s)
    append_line(event.ledger, f"bill {ctx.event_id} {ctx.idempotency_key} {ctx.worker} {event.emitted_by_attempt}")


class Relay(keel.Event):
    target: str
    seq: int
    ledger: str
    pause_first_attempt_s: float = 0.0


class Relayed(keel.Event):
    target: str
    ledger: str


@app.on(Relay)
async def relay(event: Relay, ctx: keel.HandlerContext) -> None:
    """Sends a turn and publishes an event, then (first attempt only) stalls: a test kills it there."""
    ctx.send("counter", event.target, Step(seq=event.seq))
    ctx.publish(Relayed(target=event.target, ledger=event.ledger))
    append_line(event.ledger, f"relay {ctx.attempt} {ctx.worker}")
    if ctx.attempt == 1:
        await asyncio.sleep(event.pause_first_attempt_s)


@app.on(Relayed)
async def relayed(event: Relayed, ctx: keel.HandlerContext) -> None:
    append_line(event.ledger, f"relayed {ctx.event_id} {ctx.worker}")

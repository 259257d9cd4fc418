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

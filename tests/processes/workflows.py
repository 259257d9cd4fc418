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


class Progress(BaseModel):
    applied: list[int] = []
    workers: list[str] = []


@app.workflow(state=Progress, message=Step)
async def counter(ctx: keel.TurnContext[Progress], msg: Step) -> None:
    if ctx.attempt == 1 and msg.slow_first_attempt_s:
        await asyncio.sleep(msg.slow_first_attempt_s)
    await asyncio.sleep(msg.sleep_s)
    ctx.state.applied.append(msg.seq)
    ctx.state.workers.append(ctx.worker)

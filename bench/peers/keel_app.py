"""The app keel's side of bench.peers runs in real `keel worker` processes: three no-op steps per message."""

from __future__ import annotations

from pydantic import BaseModel

import keel

app = keel.App("bench-peers")


class Go(BaseModel):
    n: int


class Done(BaseModel):
    steps: int = 0


async def noop(i: int) -> int:
    """A step that does nothing: what is measured is the durable record of its result."""
    return i


@app.workflow(state=Done, message=Go)
async def three_steps(ctx: keel.TurnContext[Done], msg: Go) -> None:
    for i in range(3):
        await ctx.step(f"step-{i}", noop, i)
        ctx.state.steps += 1

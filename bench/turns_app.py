"""The app the turns benchmark's `keel worker` processes run: one trivial turn per message."""

from __future__ import annotations

from pydantic import BaseModel

import keel

app = keel.App("bench-turns")


class Tick(BaseModel):
    n: int


class Count(BaseModel):
    count: int = 0
    last: int = -1


@app.workflow(state=Count, message=Tick)
async def tick(ctx: keel.TurnContext[Count], msg: Tick) -> None:
    ctx.state.count += 1
    ctx.state.last = msg.n


#: The steps of one ``stepped`` turn.
STEPS = 3


async def noop() -> int:
    return 1


@app.workflow(state=Count, message=Tick)
async def stepped(ctx: keel.TurnContext[Count], msg: Tick) -> None:
    """Three no-op steps, each recorded durably before the next starts, then the commit."""
    for name in ("one", "two", "three")[:STEPS]:
        ctx.state.count += await ctx.step(name, noop)
    ctx.state.last = msg.n

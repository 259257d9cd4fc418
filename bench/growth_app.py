"""The app the growth benchmark's `keel worker` runs: trivial turns, some of which send themselves the next one.

Workers are started with ``--only tick``, so messages to ``parked`` are backlog no worker of the benchmark takes:
ready work of another workflow, as left by a pool of workers that is down or behind.
"""

from __future__ import annotations

from pydantic import BaseModel

import keel

app = keel.App("bench-growth")


class Tick(BaseModel):
    n: int = 0
    #: How many more turns this one starts: each sends the next to its own instance, in its commit.
    chain: int = 0


class Count(BaseModel):
    count: int = 0


@app.workflow(state=Count, message=Tick)
async def tick(ctx: keel.TurnContext[Count], msg: Tick) -> None:
    ctx.state.count += 1
    if msg.chain > 0:
        ctx.send("tick", ctx.workflow_id, Tick(n=msg.n + 1, chain=msg.chain - 1))


@app.workflow(state=Count, message=Tick)
async def parked(ctx: keel.TurnContext[Count], msg: Tick) -> None:
    ctx.state.count += 1

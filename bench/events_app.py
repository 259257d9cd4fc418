"""The app the events benchmark's `keel worker` processes run: a turn that emits, a handler that clocks it."""

from __future__ import annotations

import time

from pydantic import BaseModel

import keel

app = keel.App("bench-events")


class Emit(BaseModel):
    #: Where the handler appends its measurement: one line per delivery.
    ledger: str


class Emitted(BaseModel):
    count: int = 0


class Ping(keel.Event):
    ledger: str
    emitted_at: float
    emitted_by: str


@app.workflow(state=Emitted, message=Emit)
async def emitter(ctx: keel.TurnContext[Emitted], msg: Emit) -> None:
    ctx.state.count += 1
    ctx.emit(Ping(ledger=msg.ledger, emitted_at=time.time(), emitted_by=ctx.worker))


@app.on(Ping)
async def clock(event: Ping, ctx: keel.HandlerContext) -> None:
    """Record when the handler started, against when the turn emitted, and whether it is another process."""
    started = time.time()
    _append(
        event.ledger, f"{(started - event.emitted_at) * 1000:.3f} {int(ctx.worker != event.emitted_by)} {started:.6f}"
    )


def _append(path: str, line: str) -> None:
    with open(path, "a") as out:
        out.write(line + "\n")

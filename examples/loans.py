"""A workflow any worker can run: `keel worker examples.loans:app`, then send it messages from anywhere.

    export KEEL_URL=sqlite:///$PWD/loans.db          # or postgresql://..., redis://...
    keel worker examples.loans:app &                  # as many as you like, on any machines sharing KEEL_URL
    keel send examples.loans:app loan 42 '{"amount": 1000}' --wait 10
    keel state examples.loans:app loan 42

    keel events examples.loans:app                    # the Decided events and their delivery to `notify`

Or from Python: `python examples/loans.py`, which runs a worker in the background and sends three messages.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

import keel
from keel.worker import serve


class LoanRequest(BaseModel):
    amount: int = Field(gt=0)


class LoanState(BaseModel):
    step: int = 0
    requested: int = 0
    approved: bool = False


class Decided(keel.Event):
    loan_id: str
    requested: int
    approved: bool


app = keel.App("loans")


@app.workflow(state=LoanState, message=LoanRequest)
async def loan(ctx: keel.TurnContext[LoanState], msg: LoanRequest) -> None:
    """One turn: ctx.state is a private copy, committed atomically when this returns."""
    ctx.state.step += 1
    ctx.state.requested += msg.amount
    ctx.state.approved = ctx.state.requested <= 5000
    ctx.logger.info("loan now at %d requested (token %d)", ctx.state.requested, ctx.fencing_token)
    # Published with the commit, and only if the turn commits; delivered to `notify` on whichever worker is free.
    ctx.emit(Decided(loan_id=ctx.workflow_id, requested=ctx.state.requested, approved=ctx.state.approved))


@app.on(Decided)
async def notify(event: Decided, ctx: keel.HandlerContext) -> None:
    """Runs once per event in effect: pass ctx.idempotency_key to any outside API that deduplicates."""
    verdict = "approved" if event.approved else "declined"
    print(f"notified: loan {event.loan_id} {verdict} at {event.requested} (key {ctx.idempotency_key[:20]}...)")


async def main(url: str) -> None:
    stop = asyncio.Event()
    worker = asyncio.create_task(serve(app, url, stop=stop))
    async with app.client(url=url) as client:
        for amount in (1000, 2500, 3000):
            message_id = await client.send("loan", "42", LoanRequest(amount=amount))
            version = await client.wait("loan", "42", message_id, timeout_s=30)
            print(f"sent {amount}: committed state version {version}")
        state = await client.state("loan", "42")
        assert state is not None
        print(f"loan 42 at version {state.version}: {state.value!r}")
        for event in await client.events():
            await client.wait_event(event.event_id, timeout_s=30)
    stop.set()  # as SIGTERM would: finish running turns, release leases
    await worker


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            asyncio.run(main(f"sqlite:///{Path(folder) / 'loans.db'}"))

"""The worker never lets a failure vanish, even one of keel's own code or of the backend."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from pydantic import BaseModel

import keel
from keel.backends import memory
from keel.backends.base import StoreOptions, TurnCommit
from keel.worker import Worker, WorkerSettings


class Msg(BaseModel):
    n: int


class State(BaseModel):
    seen: list[int] = []


class FlakyCommitBackend(memory.MemoryBackend):
    """The memory backend, whose first commit fails with an unexpected error (a bug, say)."""

    failures = 1

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("an unexpected failure inside the backend")
        return await super().commit_turn(commit)


async def test_an_unexpected_failure_is_logged_and_the_turn_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://robust-{uuid.uuid4().hex}"
    app = keel.App("robust", backend=url)

    @app.workflow(state=State, message=Msg)
    async def record(ctx: keel.TurnContext[State], msg: Msg) -> None:
        ctx.state.seen.append(msg.n)

    backend = FlakyCommitBackend(url, StoreOptions())
    stop = asyncio.Event()
    settings = WorkerSettings(lease_s=0.6, idle_poll_s=0.05)
    with caplog.at_level(logging.ERROR, logger="keel"):
        worker = asyncio.create_task(Worker(app, backend, settings).run(stop))
        async with app.client(url=url) as client:
            message_id = await client.send("record", "r", Msg(n=1))
            assert await client.wait("record", "r", message_id, timeout_s=10) == 1
            state = await client.state("record", "r")
        stop.set()
        await worker
    memory.reset(url.split("://", 1)[1])
    assert state is not None and state.value.seen == [1]
    [failure] = [r for r in caplog.records if "turn runner failed" in r.getMessage()]
    assert failure.exc_info is not None and "unexpected failure" in str(failure.exc_info[1])
    assert failure.workflow_id == "r"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("option", "value"),
    [("concurrency", 0), ("lease_s", 0), ("idle_poll_s", -1), ("grace_s", -1), ("max_state_bytes", 0)],
)
def test_worker_settings_out_of_range_are_refused(option: str, value: float) -> None:
    with pytest.raises(keel.ConfigurationError, match=option):
        WorkerSettings(**{option: value})  # type: ignore[arg-type]


async def test_list_limits_are_checked(memory_url: str) -> None:
    app = keel.App("limits", backend=memory_url)

    @app.workflow(state=State, message=Msg)
    async def record(ctx: keel.TurnContext[State], msg: Msg) -> None:
        return None

    async with app.client() as client:
        for bad in (0, -1, True):
            with pytest.raises(keel.ConfigurationError, match="limit"):
                await client.dead_letters(limit=bad)
            with pytest.raises(keel.ConfigurationError, match="limit"):
                await client.turns("record", "x", limit=bad)


class SlowReplyBackend(memory.MemoryBackend):
    """The memory backend whose commit replies arrive late: the commit is applied, the answer takes a while."""

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        version = await super().commit_turn(commit)
        await asyncio.sleep(0.5)  # the lease is already released; heartbeats run meanwhile
        return version


async def test_a_heartbeat_during_a_slow_commit_reply_is_not_a_lost_lease(caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://robust-{uuid.uuid4().hex}"
    app = keel.App("robust", backend=url)

    @app.workflow(state=State, message=Msg)
    async def record(ctx: keel.TurnContext[State], msg: Msg) -> None:
        ctx.state.seen.append(msg.n)

    backend = SlowReplyBackend(url, StoreOptions())
    stop = asyncio.Event()
    settings = WorkerSettings(lease_s=0.3, idle_poll_s=0.05)  # a heartbeat every 0.1 s, during the reply
    with caplog.at_level(logging.INFO, logger="keel"):
        worker = asyncio.create_task(Worker(app, backend, settings).run(stop))
        async with app.client(url=url) as client:
            message_id = await client.send("record", "a", Msg(n=1))
            assert await client.wait("record", "a", message_id, timeout_s=5) == 1
            await asyncio.sleep(0.6)
        stop.set()
        await worker
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("turn committed") for m in messages), messages
    assert not [m for m in messages if "lease lost" in m or "cancelled" in m], messages

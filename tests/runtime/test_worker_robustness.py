"""The worker never lets a failure vanish, even one of keel's own code or of the backend."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

import pytest
from pydantic import BaseModel

import keel
from keel.backends import open_backend
from keel.backends.base import StoreOptions
from keel.worker import Worker, WorkerSettings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from keel.backends.base import Backend, Claim, TurnCommit

    Commit = Callable[[TurnCommit], Awaitable[int]]


class Msg(BaseModel):
    n: int


class State(BaseModel):
    seen: list[int] = []


async def backend_whose_commits(url: str, wrap: Callable[[Commit], Commit]) -> Backend:
    """A real backend on ``url`` whose ``commit_turn`` goes through ``wrap``: a fault put in the worker's way."""
    backend = await open_backend(url, StoreOptions())
    setattr(backend, "commit_turn", wrap(backend.commit_turn))  # noqa: B010 - mypy refuses assigning to a method
    return backend


def fail_first(commit: Commit) -> Commit:
    """The first commit fails with an unexpected error (a bug, say); the rest go through."""
    failures = [RuntimeError("an unexpected failure inside the backend")]

    async def flaky(turn: TurnCommit) -> int:
        if failures:
            raise failures.pop()
        return await commit(turn)

    return flaky


def reply_late(commit: Commit) -> Commit:
    """Commits are applied, but their answers arrive late."""

    async def slow(turn: TurnCommit) -> int:
        version = await commit(turn)
        await asyncio.sleep(0.5)  # the lease is already released; heartbeats run meanwhile
        return version

    return slow


async def test_an_unexpected_failure_is_logged_and_the_turn_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://robust-{uuid.uuid4().hex}"
    app = keel.App("robust", backend=url)

    @app.workflow(state=State, message=Msg)
    async def record(ctx: keel.TurnContext[State], msg: Msg) -> None:
        ctx.state.seen.append(msg.n)

    backend = await backend_whose_commits(url, fail_first)
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
    await backend.aclose()
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


async def test_a_heartbeat_during_a_slow_commit_reply_is_not_a_lost_lease(caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://robust-{uuid.uuid4().hex}"
    app = keel.App("robust", backend=url)

    @app.workflow(state=State, message=Msg)
    async def record(ctx: keel.TurnContext[State], msg: Msg) -> None:
        ctx.state.seen.append(msg.n)

    backend = await backend_whose_commits(url, reply_late)
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
    await backend.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("turn committed") for m in messages), messages
    assert not [m for m in messages if "lease lost" in m or "cancelled" in m], messages


async def test_an_overloaded_backend_makes_the_worker_back_off_and_go_on_logging_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"memory://overloaded-{uuid.uuid4().hex}"
    app = keel.App("overloaded", backend=url)

    @app.workflow(state=State, message=Msg)
    async def record(ctx: keel.TurnContext[State], msg: Msg) -> None:
        ctx.state.seen.append(msg.n)

    backend = await open_backend(url, StoreOptions())
    claim = backend.claim
    refusals = [keel.BackendOverloaded(url, waited_s=30, queued=9, connections=1, hint="h") for _ in range(4)]

    async def overloaded_at_first(*args: object, **kwargs: object) -> list[Claim]:
        if refusals:
            raise refusals.pop()
        return await claim(*args, **kwargs)  # type: ignore[arg-type]

    setattr(backend, "claim", overloaded_at_first)  # noqa: B010 - mypy refuses assigning to a method
    stop = asyncio.Event()
    with caplog.at_level(logging.DEBUG, logger="keel"):
        worker = asyncio.create_task(Worker(app, backend, WorkerSettings(idle_poll_s=0.05)).run(stop))
        async with app.client(url=url) as client:
            message_id = await client.send("record", "r", Msg(n=1))
            assert await client.wait("record", "r", message_id, timeout_s=20) == 1
        stop.set()
        await worker
    await backend.aclose()
    assert refusals == []
    said = [r for r in caplog.records if "claiming refused, the backend is overloaded" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.DEBUG]
    assert any("keeps up again, after 4 call(s) refused" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

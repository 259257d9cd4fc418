"""Durable timers, retention and deletion through the client and an in-process worker, on every engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import keel
from keel.backends import open_backend
from keel.backends.base import InstanceRef, StoreOptions
from tests.conformance.test_runtime import running_worker


class Note(BaseModel):
    text: str
    fail: bool = False


class Notes(BaseModel):
    seen: list[str] = []


def make_app(url: str, **options: Any) -> keel.App:
    app = keel.App(f"timers-{uuid.uuid4().hex[:8]}", backend=url, retry=keel.RetryPolicy(max_attempts=1), **options)

    @app.workflow(state=Notes, message=Note)
    async def notes(ctx: keel.TurnContext[Notes], msg: Note) -> None:
        if msg.fail:
            raise keel.NonRetryable("told to fail")
        ctx.state.seen.append(msg.text)

    return app


async def committed_at_offset(url: str, app: keel.App, workflow_id: str, sent_at: float) -> list[float]:
    backend = await open_backend(url, StoreOptions())
    try:
        turns = await backend.turns(InstanceRef(app.name, "notes", workflow_id), limit=10)
    finally:
        await backend.aclose()
    return [(t.started_at + timedelta(seconds=t.duration_s)).timestamp() - sent_at for t in reversed(turns)]


async def test_a_timer_runs_on_time_after_messages_visible_before_it(backend_url: str) -> None:
    app = make_app(backend_url)
    async with app.client() as client, running_worker(app, backend_url):
        sent_at = time.time()
        timer = await client.send("notes", "t", Note(text="timer"), delay_s=1.5)
        now = await client.send("notes", "t", Note(text="now"))
        assert await client.wait("notes", "t", now, timeout_s=10) == 1
        assert await client.wait("notes", "t", timer, timeout_s=10) == 2
        state = await client.state("notes", "t")
        offsets = await committed_at_offset(backend_url, app, "t", sent_at)
    assert state is not None and state.value.seen == ["now", "timer"]
    assert offsets[0] < 1.0
    assert 1.5 <= offsets[1] < 2.5  # on time, within a second


@pytest.mark.parametrize("delay", [-1, float("nan"), float("inf"), 1e12, "soon"])
async def test_bad_delays_are_refused(backend_url: str, delay: Any) -> None:
    app = make_app(backend_url)
    async with app.client() as client:
        with pytest.raises(keel.ConfigurationError, match="delay_s"):
            await client.send("notes", "t", Note(text="x"), delay_s=delay)


async def test_delete_removes_an_instance_and_a_new_message_starts_it_afresh(backend_url: str) -> None:
    app = make_app(backend_url)
    async with app.client() as client, running_worker(app, backend_url):
        first = await client.send("notes", "d", Note(text="one"))
        await client.wait("notes", "d", first, timeout_s=10)
        assert await client.delete("notes", "d") is True
        assert await client.state("notes", "d") is None
        with pytest.raises(keel.MessageNotFoundError):
            await client.wait("notes", "d", first, timeout_s=1)
        again = await client.send("notes", "d", Note(text="two"))
        assert await client.wait("notes", "d", again, timeout_s=10) == 1
        state = await client.state("notes", "d")
        assert state is not None and state.value.seen == ["two"]
        assert await client.delete("notes", "never-seen") is False
        with pytest.raises(keel.UnknownWorkflowError):
            await client.delete("nope", "d")


async def test_workers_prune_finished_records_and_keep_everything_undelivered(backend_url: str) -> None:
    retention = keel.Retention(finished_s=0.2, idempotency_s=3600, interval_s=0.3)
    app = make_app(backend_url, retention=retention)
    async with app.client() as client, running_worker(app, backend_url):
        done = await client.send("notes", "p", Note(text="done"))
        keyed = await client.send("notes", "p", Note(text="keyed"), idempotency_key="k1")
        await client.wait("notes", "p", keyed, timeout_s=10)
        dead = await client.send("notes", "q", Note(text="dead", fail=True))
        with pytest.raises(keel.TurnFailedError):
            await client.wait("notes", "q", dead, timeout_s=10)
        queued = await client.send("notes", "q", Note(text="queued"))
        timer = await client.send("notes", "r", Note(text="later"), delay_s=3600)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                await client.wait("notes", "p", done, timeout_s=1)
            except keel.MessageNotFoundError:
                break  # pruned
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the finished message was never pruned")
        assert await client.send("notes", "p", Note(text="keyed"), idempotency_key="k1") == keyed
        assert [d.message_id for d in await client.dead_letters()] == [dead]
        for waiting in (queued, timer):
            with pytest.raises(keel.WaitTimeoutError):
                await client.wait("notes", "q" if waiting == queued else "r", waiting, timeout_s=0.2)
        state = await client.state("notes", "p")
    assert state is not None and state.value.seen == ["done", "keyed"]

"""Workflows, turns, the client and an in-process worker, on every engine (G2, G3, G7, G8, G9)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel, Field

import keel
from keel.backends import open_backend
from keel.backends.base import StoreOptions
from keel.worker import Worker, WorkerSettings, serve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class LoanRequest(BaseModel):
    amount: int = Field(gt=0)
    note: str = ""


class LoanState(BaseModel):
    step: int = 0
    total: int = 0
    amounts: list[int] = []
    tokens: list[int] = []


def make_app(url: str) -> keel.App:
    # Quick retries, so that attempts run out within a test's patience.
    policy = keel.RetryPolicy(max_attempts=3, initial_delay_s=0.05, max_delay_s=0.2)
    app = keel.App(f"test-{uuid.uuid4().hex[:8]}", backend=url, retry=policy)
    gates: dict[str, asyncio.Event] = {}
    app.gates = gates  # type: ignore[attr-defined]

    @app.workflow(state=LoanState, message=LoanRequest)
    async def loan(ctx: keel.TurnContext[LoanState], msg: LoanRequest) -> None:
        if msg.note.startswith("gate:"):
            await gates.setdefault(msg.note, asyncio.Event()).wait()
        if msg.note == "boom":
            raise ValueError("the model said no")
        if msg.note == "invalid-state":
            ctx.state.step = "not a number"  # type: ignore[assignment]
            return
        ctx.state.step += 1
        ctx.state.total += msg.amount
        ctx.state.amounts.append(msg.amount)
        ctx.state.tokens.append(ctx.fencing_token)
        ctx.logger.info("applied %d", msg.amount)

    return app


@contextlib.asynccontextmanager
async def running_worker(app: keel.App, url: str, **settings: Any) -> AsyncIterator[asyncio.Event]:
    backend = await open_backend(url, StoreOptions())
    stop = asyncio.Event()
    options = {"concurrency": 4, "lease_s": 3.0, "grace_s": 5.0, "idle_poll_s": 0.2, **settings}
    try:
        task = asyncio.create_task(Worker(app, backend, WorkerSettings(**options)).run(stop))
        try:
            yield stop
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
    finally:
        await backend.aclose()


@pytest.fixture
def app(backend_url: str) -> keel.App:
    return make_app(backend_url)


async def test_a_turn_starts_from_defaults_and_commits_version_one(app: keel.App, backend_url: str) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        assert await client.state("loan", "42") is None
        message_id = await client.send("loan", "42", LoanRequest(amount=1000))
        assert await client.wait("loan", "42", message_id, timeout_s=10) == 1
        current = await client.state("loan", "42")
    assert current is not None
    assert isinstance(current.value, LoanState)
    assert (current.version, current.value.step, current.value.total) == (1, 1, 1000)


async def test_turns_of_one_instance_apply_once_each_in_send_order(app: keel.App, backend_url: str) -> None:
    async with app.client() as client:
        ids = [await client.send("loan", "a", {"amount": n}) for n in range(1, 7)]
        async with running_worker(app, backend_url):
            versions = [await client.wait("loan", "a", i, timeout_s=10) for i in ids]
        current = await client.state("loan", "a")
    assert versions == [1, 2, 3, 4, 5, 6]
    assert current is not None
    assert current.value.amounts == [1, 2, 3, 4, 5, 6]
    assert current.value.tokens == sorted(set(current.value.tokens))  # a fresh token per turn, growing


async def test_a_repeated_idempotency_key_enqueues_nothing(app: keel.App, backend_url: str) -> None:
    async with app.client() as client:
        first = await client.send("loan", "42", LoanRequest(amount=5), idempotency_key="req-1")
        again = await client.send("loan", "42", LoanRequest(amount=5), idempotency_key="req-1")
        assert again == first
        with pytest.raises(keel.IdempotencyConflictError, match="'req-1'.*loan/42.*" + first):
            await client.send("loan", "42", LoanRequest(amount=7), idempotency_key="req-1")
        async with running_worker(app, backend_url):
            await client.wait("loan", "42", first, timeout_s=10)
            follow = await client.send("loan", "42", LoanRequest(amount=1))
            assert await client.wait("loan", "42", follow, timeout_s=10) == 2
        current = await client.state("loan", "42")
    assert current is not None
    assert current.value.amounts == [5, 1]


async def test_an_invalid_message_names_the_field_and_enqueues_nothing(app: keel.App, backend_url: str) -> None:
    async with app.client() as client:
        with pytest.raises(keel.PayloadValidationError, match="amount") as caught:
            await client.send("loan", "42", {"amount": -5})
        assert caught.value.errors[0]["loc"] == ("amount",)
        with pytest.raises(keel.PayloadValidationError, match="amount"):
            await client.send("loan", "42", {"note": "no amount"})
        async with running_worker(app, backend_url):
            valid = await client.send("loan", "42", {"amount": 3})
            assert await client.wait("loan", "42", valid, timeout_s=10) == 1


async def test_an_unknown_workflow_lists_the_registered_ones(app: keel.App) -> None:
    async with app.client() as client:
        with pytest.raises(keel.UnknownWorkflowError, match="registered workflows: loan"):
            await client.send("lone", "42", {"amount": 1})
        with pytest.raises(keel.UnknownWorkflowError):
            await client.state("lone", "42")


async def test_an_oversized_message_is_refused(app: keel.App) -> None:
    async with app.client() as client:
        with pytest.raises(keel.PayloadTooLargeError):
            await client.send("loan", "42", {"amount": 1, "note": "x" * (1024 * 1024 + 1)})
        with pytest.raises(keel.InvalidKeyError):
            await client.send("loan", "bad\nid", {"amount": 1})


async def test_a_state_the_function_makes_invalid_is_not_committed(app: keel.App, backend_url: str) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        ok = await client.send("loan", "42", {"amount": 1})
        await client.wait("loan", "42", ok, timeout_s=10)
        bad = await client.send("loan", "42", {"amount": 2, "note": "invalid-state"})
        later = await client.send("loan", "42", {"amount": 3})
        with pytest.raises(keel.TurnFailedError, match="step") as caught:
            await client.wait("loan", "42", bad, timeout_s=10)
        assert "LoanState" in caught.value.error
        with pytest.raises(keel.WaitTimeoutError):
            await client.wait("loan", "42", later, timeout_s=0.5)  # the instance is paused; the message waits
        current = await client.state("loan", "42")
    assert current is not None
    assert (current.version, current.value.amounts) == (1, [1])


async def test_a_turn_that_raises_reports_its_traceback(app: keel.App, backend_url: str) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        message_id = await client.send("loan", "42", {"amount": 1, "note": "boom"})
        with pytest.raises(keel.TurnFailedError, match="the model said no") as caught:
            await client.wait("loan", "42", message_id, timeout_s=10)
    assert "Traceback" in caught.value.error and "ValueError" in caught.value.error


async def test_wait_for_an_unknown_message_or_past_its_timeout(app: keel.App) -> None:
    async with app.client() as client:
        with pytest.raises(keel.MessageNotFoundError):
            await client.wait("loan", "42", "no-such-message", timeout_s=1)
        message_id = await client.send("loan", "42", {"amount": 1})
        with pytest.raises(keel.MessageNotFoundError):
            await client.wait("loan", "another-instance", message_id, timeout_s=1)
        with pytest.raises(keel.WaitTimeoutError, match="keel worker"):
            await client.wait("loan", "42", message_id, timeout_s=0.3)  # no worker is running


async def test_different_instances_run_in_parallel_and_one_instance_never_does(app: keel.App, backend_url: str) -> None:
    gates: dict[str, asyncio.Event] = app.gates  # type: ignore[attr-defined]
    async with app.client() as client, running_worker(app, backend_url, concurrency=4):
        a1 = await client.send("loan", "a", {"amount": 1, "note": "gate:a"})
        a2 = await client.send("loan", "a", {"amount": 2})
        b1 = await client.send("loan", "b", {"amount": 3})
        assert await client.wait("loan", "b", b1, timeout_s=10) == 1  # b is not held up by a's open turn
        with pytest.raises(keel.WaitTimeoutError):
            await client.wait("loan", "a", a2, timeout_s=0.5)  # a's second turn waits for its first
        gates.setdefault("gate:a", asyncio.Event()).set()
        assert await client.wait("loan", "a", a1, timeout_s=10) == 1
        assert await client.wait("loan", "a", a2, timeout_s=10) == 2


async def test_turn_logs_carry_the_instance_worker_version_token_and_attempt(
    app: keel.App, backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="keel"):
        async with app.client() as client, running_worker(app, backend_url):
            message_id = await client.send("loan", "42", {"amount": 9})
            await client.wait("loan", "42", message_id, timeout_s=10)
    committed = [r for r in caplog.records if r.getMessage().startswith("turn committed")]
    applied = [r for r in caplog.records if r.getMessage() == "applied 9"]
    assert committed and applied
    for record in (committed[0], applied[0]):
        assert (record.workflow, record.workflow_id, record.attempt) == ("loan", "42", 1)  # type: ignore[attr-defined]
        assert record.worker.count(":") == 1  # type: ignore[attr-defined]
        assert record.fencing_token >= 1  # type: ignore[attr-defined]
    assert committed[0].state_version == 1  # type: ignore[attr-defined]
    assert applied[0].state_version == 0  # type: ignore[attr-defined]


async def test_stopping_lets_a_running_turn_finish(app: keel.App, backend_url: str) -> None:
    gates: dict[str, asyncio.Event] = app.gates  # type: ignore[attr-defined]
    async with app.client() as client:
        message_id = await client.send("loan", "42", {"amount": 1, "note": "gate:stop"})
        async with running_worker(app, backend_url) as stop:
            await asyncio.sleep(0.5)  # the turn is running and waits at its gate
            stop.set()
            await asyncio.sleep(0.2)
            gates.setdefault("gate:stop", asyncio.Event()).set()
        assert await client.wait("loan", "42", message_id, timeout_s=5) == 1


async def test_a_worker_refuses_memory_urls(app: keel.App) -> None:
    with pytest.raises(keel.ConfigurationError, match="memory:// lives inside one process"):
        await serve(app, "memory://anything")


async def test_turn_records_rebuild_the_timeline_oldest_first(app: keel.App, backend_url: str) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        first = await client.send("loan", "42", {"amount": 1})
        second = await client.send("loan", "42", {"amount": 2})
        await client.wait("loan", "42", second, timeout_s=10)
        turns = await client.turns("loan", "42")
        assert [(t.message_id, t.outcome, t.version_read, t.version_written) for t in turns] == [
            (first, "committed", 0, 1),
            (second, "committed", 1, 2),
        ]
        assert turns[0].fencing_token < turns[1].fencing_token
        assert [t.message_id for t in await client.turns("loan", "42", limit=1)] == [second]
        with pytest.raises(keel.ConfigurationError, match="limit"):
            await client.turns("loan", "42", limit=0)

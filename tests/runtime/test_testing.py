"""keel.testing: workflows unit-tested in process, through the same machinery a worker runs."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import pytest
from pydantic import BaseModel

import keel
from keel.observe import ContextFormatter, JsonFormatter
from keel.testing import WorkflowTester

if TYPE_CHECKING:
    from pathlib import Path


class Add(BaseModel):
    n: int


class Sum(BaseModel):
    total: int = 0
    doubled: int = 0


def make_app() -> keel.App:
    app = keel.App("testing-demo", retry=keel.RetryPolicy(max_attempts=1))

    async def double(n: int) -> int:
        return 2 * n

    @app.workflow(state=Sum, message=Add)
    async def adder(ctx: keel.TurnContext[Sum], msg: Add) -> None:
        if msg.n < 0:
            raise keel.NonRetryable("negative numbers are refused")
        ctx.state.total += msg.n
        ctx.state.doubled = await ctx.step("double", double, ctx.state.total)

    return app


async def test_run_sends_waits_and_returns_the_state() -> None:
    async with WorkflowTester(make_app()) as tester:
        first = await tester.run("adder", "a", Add(n=2))
        second = await tester.run("adder", "a", {"n": 3})
        assert (first.version, second.version) == (1, 2)
        assert second.value == Sum(total=5, doubled=10)
        assert await tester.state("adder", "b") is None


async def test_failures_surface_as_in_production() -> None:
    async with WorkflowTester(make_app()) as tester:
        with pytest.raises(keel.TurnFailedError, match="negative numbers"):
            await tester.run("adder", "a", Add(n=-1))
        [letter] = await tester.client.dead_letters()
        assert letter.instance.workflow_id == "a"
        assert letter.instance == keel.WorkflowInstance("adder", "a")
        with pytest.raises(keel.PayloadValidationError, match="n"):
            await tester.send("adder", "a", {"n": "many"})


async def test_each_tester_has_its_own_data() -> None:
    app = make_app()
    async with WorkflowTester(app) as tester:
        await tester.run("adder", "a", Add(n=1))
    async with WorkflowTester(app) as tester:
        assert await tester.state("adder", "a") is None


class Added(keel.Event):
    total: int


def make_event_app(seen: list[tuple[str, int]]) -> keel.App:
    app = keel.App("testing-events", retry=keel.RetryPolicy(max_attempts=1))

    @app.workflow(state=Sum, message=Add)
    async def adder(ctx: keel.TurnContext[Sum], msg: Add) -> None:
        ctx.state.total += msg.n
        ctx.emit(Added(total=ctx.state.total))

    @app.on(Added)
    async def record(event: Added, ctx: keel.HandlerContext) -> None:
        if event.total < 0:
            raise keel.NonRetryable("negative totals are refused")
        seen.append((ctx.idempotency_key, event.total))

    return app


async def test_deliver_publishes_and_waits_for_every_handler() -> None:
    seen: list[tuple[str, int]] = []
    async with WorkflowTester(make_event_app(seen)) as tester:
        event_id = await tester.deliver(Added(total=5))
        assert seen == [(f"record:{event_id}", 5)]
        await tester.run("adder", "a", Add(n=2))
        [emitted, published] = await tester.events()
        await tester.client.wait_event(emitted.event_id, timeout_s=5)
        assert (emitted.payload, published.event_id) == ({"total": 2}, event_id)
        assert seen[-1] == (f"record:{emitted.event_id}", 2)
        with pytest.raises(keel.TurnFailedError, match="negative totals are refused"):
            await tester.deliver(Added(total=-1))


async def test_app_client_inside_the_tester_reaches_the_testers_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEEL_URL", raising=False)
    app = make_app()
    async with WorkflowTester(app) as tester:
        async with app.client() as client:  # what code under test opens: never ./keel.db
            message_id = await client.send("adder", "a", Add(n=4))
        assert await tester.client.wait("adder", "a", message_id, timeout_s=5) == 1
        state = await tester.state("adder", "a")
        assert state is not None and state.value.total == 4
        with pytest.raises(keel.ConfigurationError, match="already under test"):
            await WorkflowTester(app).__aenter__()
    assert not (tmp_path / "keel.db").exists()
    assert app.backend_url == "sqlite:///keel.db"  # the app is itself again after the tester


async def test_waiting_on_another_instances_message_says_where_it_went() -> None:
    async with WorkflowTester(make_app()) as tester:
        message_id = await tester.send("adder", "a", Add(n=1))
        with pytest.raises(keel.MessageNotFoundError, match=r"was sent to adder/a, not to adder/b") as wrong:
            await tester.client.wait("adder", "b", message_id, timeout_s=5)
        assert (wrong.value.expected, wrong.value.sent_to) == ("adder/b", "adder/a")
        with pytest.raises(keel.MessageNotFoundError, match=r"has no message 'nope'"):
            await tester.client.wait("adder", "a", "nope", timeout_s=5)


async def test_turn_records_and_dead_letters_are_keel_types() -> None:
    async with WorkflowTester(make_app()) as tester:
        await tester.run("adder", "a", Add(n=1))
        with pytest.raises(keel.TurnFailedError):
            await tester.run("adder", "a", Add(n=-1))
        [letter] = await tester.client.dead_letters()
        assert isinstance(letter, keel.DeadLetter) and letter.instance == keel.WorkflowInstance("adder", "a")
        turns = await tester.client.turns(letter.instance)
        assert turns == await tester.client.turns("adder", "a")
        assert [(type(t), t.outcome, t.version_read, t.version_written) for t in turns] == [
            (keel.TurnRecord, keel.TurnOutcome.committed, 0, 1),
            (keel.TurnRecord, keel.TurnOutcome.failed, 1, None),
        ]
        assert await tester.client.skip(letter.instance) == letter.message_id
        with pytest.raises(keel.ConfigurationError, match="alone, without a workflow_id"):
            await tester.client.retry(letter.instance, "a")
        with pytest.raises(keel.ConfigurationError, match=r"as \(workflow, workflow_id\)"):
            await tester.client.retry("adder")
        with pytest.raises(keel.UnknownWorkflowError, match="registered handlers: none"):
            await tester.client.retry(keel.HandlerDelivery("nobody", "e1"))


async def test_delivery_log_lines_show_the_handler_and_event_and_no_state_version(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="keel")
    seen: list[tuple[str, int]] = []
    async with WorkflowTester(make_event_app(seen)) as tester:
        event_id = await tester.deliver(Added(total=5))
        await tester.run("adder", "a", Add(n=1))
    [done] = [
        r
        for r in caplog.records
        if r.getMessage().startswith("handler record done") and getattr(r, "event_id", None) == event_id
    ]
    text = ContextFormatter("%(message)s").format(done)
    assert f"workflow=on/record workflow_id={event_id} handler=record event_id={event_id} worker=" in text
    assert "state_version" not in text
    line = json.loads(JsonFormatter().format(done))
    assert (line["handler"], line["event_id"], line["workflow"]) == ("record", event_id, "on/record")
    assert "state_version" not in line
    [committed] = [r for r in caplog.records if r.getMessage().startswith("turn committed")]
    assert "state_version=1" in ContextFormatter("%(message)s").format(committed)
    assert "handler" not in json.loads(JsonFormatter().format(committed))


async def test_a_handler_sees_what_emitted_its_event_as_a_typed_value() -> None:
    app = keel.App("testing-sources", retry=keel.RetryPolicy(max_attempts=1))
    sources: list[keel.Target | None] = []

    @app.workflow(state=Sum, message=Add)
    async def adder(ctx: keel.TurnContext[Sum], msg: Add) -> None:
        ctx.emit(Added(total=msg.n))

    @app.on(Added)
    async def relay(event: Added, ctx: keel.HandlerContext) -> None:
        sources.append(ctx.source)
        if event.total > 0:
            ctx.publish(Added(total=-event.total))

    async with WorkflowTester(app) as tester:
        await tester.run("adder", "a", Add(n=3))
        [emitted] = [e for e in await tester.events() if e.source == keel.WorkflowInstance("adder", "a")]
        await tester.client.wait_event(emitted.event_id, timeout_s=5)  # its handler's publish is committed too
        [relayed] = [e for e in await tester.events() if e.event_id != emitted.event_id]
        await tester.client.wait_event(relayed.event_id, timeout_s=5)
        assert relayed.source == keel.HandlerDelivery("relay", emitted.event_id)
    assert sources == [keel.WorkflowInstance("adder", "a"), keel.HandlerDelivery("relay", emitted.event_id)]

"""Events and handlers, end to end with an in-process worker, on every engine (G3, G5, G6, G8, G9).

The apps here record what their handlers saw in plain lists (the "ledger"): every test checks both that each
event reached each handler and that nothing ran twice that should not have.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel

import keel
from keel.backends import open_backend
from keel.backends.base import MessageStatus, StoreOptions
from keel.events import build_event
from tests.conformance.test_runtime import running_worker

if TYPE_CHECKING:
    from collections.abc import Callable


class Order(BaseModel):
    item: str
    fail_first: bool = False
    always_fail: bool = False


class OrderState(BaseModel):
    items: list[str] = []


class Shipped(keel.Event):
    order_id: str
    item: str


class Audited(keel.Event):
    order_id: str


class Note(BaseModel):
    text: str


class Inbox(BaseModel):
    notes: list[str] = []


class Ledger:
    """What handlers did, in this process."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, int]] = []  # handler, event id, idempotency key, attempt
        self.failures: dict[str, int] = {}
        self.contexts: list[keel.HandlerContext] = []

    def of(self, handler: str) -> list[tuple[str, str, str, int]]:
        return [entry for entry in self.entries if entry[0] == handler]


def make_app(url: str, ledger: Ledger, **options: Any) -> keel.App:
    policy = keel.RetryPolicy(max_attempts=3, initial_delay_s=0.05, max_delay_s=0.1)
    app = keel.App(f"test-{uuid.uuid4().hex[:8]}", backend=url, retry=policy, **options)
    attempts: dict[str, int] = {}

    @app.workflow(state=OrderState, message=Order)
    async def order(ctx: keel.TurnContext[OrderState], msg: Order) -> None:
        ctx.state.items.append(msg.item)
        ctx.emit(Shipped(order_id=ctx.workflow_id, item=msg.item))
        attempts[ctx.message_id] = attempts.get(ctx.message_id, 0) + 1
        if msg.always_fail or (msg.fail_first and attempts[ctx.message_id] == 1):
            raise RuntimeError("the turn failed after emitting")

    @app.workflow(state=Inbox, message=Note)
    async def inbox(ctx: keel.TurnContext[Inbox], msg: Note) -> None:
        ctx.state.notes.append(msg.text)

    @app.on(Shipped)
    async def mail(event: Shipped, ctx: keel.HandlerContext) -> None:
        ledger.contexts.append(ctx)
        if event.item.startswith("flaky") and ledger.failures.get(ctx.event_id, 0) < 2:
            ledger.failures[ctx.event_id] = ledger.failures.get(ctx.event_id, 0) + 1
            raise ConnectionError("the mail API timed out")
        if event.item == "poison":
            raise keel.NonRetryable("this address is banned")
        if event.item == "slow":
            await asyncio.sleep(5)
        ledger.entries.append(("mail", ctx.event_id, ctx.idempotency_key, ctx.attempt))

    @app.on(Shipped)
    async def audit(event: Shipped, ctx: keel.HandlerContext) -> None:
        if event.item == "stepped":
            await charge_once(ctx, ledger)
        if event.item == "chain":
            send_and_publish_then_fail_once(event, ctx, ledger)
        ledger.entries.append(("audit", ctx.event_id, ctx.idempotency_key, ctx.attempt))

    @app.on(Audited)
    async def archive(event: Audited, ctx: keel.HandlerContext) -> None:
        ledger.entries.append(("archive", ctx.event_id, ctx.idempotency_key, ctx.attempt))

    return app


def send_and_publish_then_fail_once(event: Shipped, ctx: keel.HandlerContext, ledger: Ledger) -> None:
    """Queue a send and a publish, then fail the first run: both must still happen once."""
    ctx.send("inbox", event.order_id, Note(text=f"shipped {event.item}"))
    ctx.publish(Audited(order_id=event.order_id))
    if ledger.failures.get(f"chain:{ctx.event_id}", 0) == 0:
        ledger.failures[f"chain:{ctx.event_id}"] = 1
        raise ConnectionError("failed after sending and publishing")


async def charge_once(ctx: keel.HandlerContext, ledger: Ledger) -> None:
    """A step with an outside effect, then a failure on the first attempt: the redelivery must replay the step."""

    def charge(event_id: str) -> int:
        ledger.failures[f"charge:{event_id}"] = ledger.failures.get(f"charge:{event_id}", 0) + 1
        return 42

    charged = await ctx.step("charge", charge, ctx.event_id)
    ledger.entries.append(("charged", ctx.event_id, str(charged), ctx.attempt))
    if ctx.attempt == 1:
        raise ConnectionError("failed after the step")


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def app(backend_url: str, ledger: Ledger) -> keel.App:
    return make_app(backend_url, ledger)


async def eventually(check: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail("the condition did not hold in time")
        await asyncio.sleep(0.02)


async def test_an_emitted_event_reaches_every_handler_once(app: keel.App, backend_url: str, ledger: Ledger) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        message_id = await client.send("order", "o1", Order(item="book"))
        await client.wait("order", "o1", message_id, timeout_s=10)
        [pending] = await client.events()
        await client.wait_event(pending.event_id, timeout_s=10)
        [event] = await client.events()

        assert (event.type, event.payload) == ("Shipped", {"order_id": "o1", "item": "book"})
        assert event.source_message_id == message_id
        assert event.source is not None
        assert (event.source.workflow, event.source.workflow_id) == ("order", "o1")
        assert [(d.handler, d.status) for d in event.deliveries] == [
            ("mail", MessageStatus.done),
            ("audit", MessageStatus.done),
        ]
        assert sorted(entry[:3] for entry in ledger.entries) == [
            ("audit", event.event_id, f"audit:{event.event_id}"),
            ("mail", event.event_id, f"mail:{event.event_id}"),
        ]
        [ctx] = ledger.contexts
        assert (ctx.event_type, ctx.source_workflow, ctx.source_workflow_id) == ("Shipped", "order", "o1")
        await asyncio.sleep(0.3)
        assert len(ledger.entries) == 2  # and nothing runs again later


async def test_an_event_emitted_by_a_failed_attempt_never_reaches_a_handler(
    app: keel.App, backend_url: str, ledger: Ledger
) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        retried = await client.send("order", "o1", Order(item="book", fail_first=True))
        await client.wait("order", "o1", retried, timeout_s=10)
        doomed = await client.send("order", "o2", Order(item="never", always_fail=True))
        with pytest.raises(keel.TurnFailedError):
            await client.wait("order", "o2", doomed, timeout_s=10)
        [event] = await client.events()  # one event: the committed attempt's; none of the five failed ones
        await client.wait_event(event.event_id, timeout_s=10)
        assert event.payload["item"] == "book"
        assert sorted(entry[0] for entry in ledger.entries) == ["audit", "mail"]


async def test_events_published_before_any_worker_started_are_delivered(
    app: keel.App, backend_url: str, ledger: Ledger
) -> None:
    async with app.client() as client:
        first = await client.publish(Shipped(order_id="o1", item="book"), idempotency_key="o1-shipped")
        assert await client.publish(Shipped(order_id="o1", item="book"), idempotency_key="o1-shipped") == first
        with pytest.raises(keel.IdempotencyConflictError, match="'o1-shipped'.*" + first):
            await client.publish(Shipped(order_id="o1", item="pen"), idempotency_key="o1-shipped")
        second = await client.publish(Shipped(order_id="o2", item="pen"))
        async with running_worker(app, backend_url):
            await client.wait_event(first, timeout_s=10)
            await client.wait_event(second, timeout_s=10)
        events = await client.events()
        assert [e.event_id for e in events] == [second, first]
        assert events[1].idempotency_key == "o1-shipped"
        assert events[1].source is None
        assert sorted(entry[:2] for entry in ledger.entries) == sorted(
            [("mail", first), ("audit", first), ("mail", second), ("audit", second)]
        )


async def test_a_failing_handler_is_retried_with_the_same_idempotency_key(
    app: keel.App, backend_url: str, ledger: Ledger
) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        event_id = await client.publish(Shipped(order_id="o1", item="flaky"))
        await client.wait_event(event_id, timeout_s=10)
        assert ledger.of("mail") == [("mail", event_id, f"mail:{event_id}", 3)]
        assert ledger.failures[event_id] == 2
        keys = {ctx.idempotency_key for ctx in ledger.contexts}
        assert keys == {f"mail:{event_id}"}
        assert [ctx.attempt for ctx in ledger.contexts] == [1, 2, 3]
        assert len(ledger.of("audit")) == 1  # the other handler ran once, on its own


async def test_a_dead_lettered_delivery_is_listed_retried_and_skipped(app: keel.App, backend_url: str) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        event_id = await client.publish(Shipped(order_id="o1", item="poison"))
        with pytest.raises(keel.TurnFailedError, match="this address is banned"):
            await client.wait_event(event_id, timeout_s=10)
        [dead] = await client.dead_letters()
        assert (dead.instance.workflow, dead.instance.workflow_id, dead.attempts) == ("on/mail", event_id, 1)
        assert "NonRetryable: this address is banned" in dead.error
        [event] = await client.events()
        statuses = {d.handler: d.status for d in event.deliveries}
        assert statuses == {"mail": MessageStatus.failed, "audit": MessageStatus.done}

        await client.retry("on/mail", event_id)  # fails again, for good
        await asyncio.sleep(0.3)
        [dead_again] = await client.dead_letters()
        assert dead_again.message_id == dead.message_id
        assert await client.skip("on/mail", event_id) == dead.message_id
        with pytest.raises(keel.TurnFailedError, match="skipped"):
            await client.wait_event(event_id, timeout_s=10)
        assert await client.dead_letters() == []
        with pytest.raises(keel.UnknownWorkflowError, match="on/audit"):
            await client.retry("on/nobody", event_id)


async def test_a_delivery_that_no_longer_fits_its_model_is_dead_lettered_with_the_field(
    app: keel.App, backend_url: str
) -> None:
    class Shipped(keel.Event):  # the event as an older deployment defined it: no item
        order_id: str
        weight: int

    backend = await open_backend(backend_url, StoreOptions())
    try:
        old = build_event(app.name, Shipped(order_id="o1", weight=3), ["mail"], event_id="old-1", max_bytes=10_000)
        await backend.publish(old)
    finally:
        await backend.aclose()
    async with app.client() as client, running_worker(app, backend_url):
        with pytest.raises(keel.TurnFailedError, match=r"does not fit Shipped: item: Field required"):
            await client.wait_event("old-1", timeout_s=10)
        [dead] = await client.dead_letters()
        assert dead.attempts == 1
        assert "did a deployment change Shipped?" in dead.error


async def test_a_handlers_sends_and_publishes_happen_once_with_its_success(
    app: keel.App, backend_url: str, ledger: Ledger
) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        event_id = await client.publish(Shipped(order_id="o7", item="chain"))
        await client.wait_event(event_id, timeout_s=10)
        await eventually(lambda: len(ledger.of("archive")) == 1)
        await asyncio.sleep(0.3)
        state = await client.state("inbox", "o7")
        assert state is not None
        assert state.value.notes == ["shipped chain"]  # once, though the handler ran twice
        assert len(ledger.of("archive")) == 1
        audited = [e for e in await client.events() if e.type == "Audited"]
        assert len(audited) == 1
        assert audited[0].source is not None
        assert (audited[0].source.workflow, audited[0].source.workflow_id) == ("on/audit", event_id)


async def test_a_hung_handler_times_out_and_is_retried(backend_url: str, ledger: Ledger) -> None:
    app = make_app(backend_url, ledger, turn_timeout_s=0.3)
    async with app.client() as client, running_worker(app, backend_url):
        event_id = await client.publish(Shipped(order_id="o1", item="slow"))
        with pytest.raises(keel.TurnFailedError, match=r"handler mail on event .* ran past its timeout of 0\.3 s"):
            await client.wait_event(event_id, timeout_s=10)
        [dead] = await client.dead_letters()
        assert dead.attempts == 3


async def test_handler_logs_carry_the_handler_event_worker_and_attempt(
    app: keel.App, backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keel")
    async with app.client() as client, running_worker(app, backend_url):
        event_id = await client.publish(Shipped(order_id="o1", item="book"))
        await client.wait_event(event_id, timeout_s=10)
    done = [r for r in caplog.records if r.getMessage().startswith("handler mail done")]
    assert done, [r.getMessage() for r in caplog.records]
    record = done[0]
    assert (record.handler, record.event_id, record.attempt) == ("mail", event_id, 1)  # type: ignore[attr-defined]
    assert record.worker  # type: ignore[attr-defined]
    assert record.workflow == "on/mail"  # type: ignore[attr-defined]


async def test_publish_refuses_bad_input_and_stores_nothing(app: keel.App) -> None:
    async with app.client() as client:
        with pytest.raises(TypeError, match=r"keel\.Event"):
            await client.publish(Order(item="x"))  # type: ignore[arg-type]
        with pytest.raises(keel.InvalidKeyError):
            await client.publish(Shipped(order_id="o1", item="x"), idempotency_key="")
        with pytest.raises(keel.PayloadTooLargeError):
            await client.publish(Shipped(order_id="o1", item="x" * 2_000_000))
        with pytest.raises(keel.ConfigurationError):
            await client.events(limit=0)
        with pytest.raises(keel.MessageNotFoundError):
            await client.wait_event("no-such-event", timeout_s=0.1)
        assert await client.events() == []


async def test_a_worker_limited_to_some_handlers_runs_only_those(
    app: keel.App, backend_url: str, ledger: Ledger
) -> None:
    async with app.client() as client:
        event_id = await client.publish(Shipped(order_id="o1", item="book"))
        message_id = await client.send("order", "o2", Order(item="pen"))
        async with running_worker(app, backend_url, only=("mail",)):
            await eventually(lambda: len(ledger.of("mail")) == 1)
            await asyncio.sleep(0.3)
            assert ledger.of("audit") == []  # not this worker's handler
            info = await client._open().message(app.name, message_id)
            assert info is not None
            assert info.status is MessageStatus.pending  # nor this worker's workflow
        async with running_worker(app, backend_url):
            await client.wait_event(event_id, timeout_s=10)
            await client.wait("order", "o2", message_id, timeout_s=10)
    with pytest.raises(keel.ConfigurationError, match="has no such workflow or handler"):
        async with running_worker(app, backend_url, only=("nope",)):
            pass


class Unhandled(keel.Event):
    note: str


async def test_an_event_without_a_handler_is_logged_and_reported(
    app: keel.App, caplog: pytest.LogCaptureFixture
) -> None:
    async with app.client() as client:
        with caplog.at_level(logging.WARNING, logger="keel.events"):
            event_id = await client.publish(Unhandled(note="nobody listens"))
        [event] = await client.events()
    assert (event.event_id, event.type, event.deliveries) == (event_id, "Unhandled", ())
    [record] = [r for r in caplog.records if r.name == "keel.events"]
    assert "has no handler in app" in record.getMessage()
    assert "@app.on(Unhandled)" in record.getMessage()


async def test_a_handlers_step_runs_once_across_redeliveries(app: keel.App, backend_url: str, ledger: Ledger) -> None:
    async with app.client() as client, running_worker(app, backend_url):
        event_id = await client.publish(Shipped(order_id="o1", item="stepped"))
        await client.wait_event(event_id, timeout_s=10)
    assert ledger.failures[f"charge:{event_id}"] == 1  # the side effect ran once
    assert [e for e in ledger.entries if e[0] == "charged"] == [
        ("charged", event_id, "42", 1),
        ("charged", event_id, "42", 2),  # the redelivery got the recorded result
    ]

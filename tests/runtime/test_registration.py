"""The app registry: signatures checked at registration, and no registration after start (G7)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import keel
from keel.testing import WorkflowTester


class State(BaseModel):
    n: int = 0


class Msg(BaseModel):
    amount: int


class OtherState(BaseModel):
    x: int = 0


class OtherMsg(BaseModel):
    y: int


def test_a_well_formed_workflow_registers_under_its_function_name() -> None:
    app = keel.App("t")

    @app.workflow(state=State, message=Msg)
    async def loan(ctx: keel.TurnContext[State], msg: Msg) -> None:
        ctx.state.n += msg.amount

    assert list(app.workflows) == ["loan"]
    assert app.spec("loan").state is State
    assert app.spec("loan").fn is loan


def test_string_annotations_and_an_explicit_name_are_accepted() -> None:
    app = keel.App("t")

    async def handler(ctx: "keel.TurnContext[State]", msg: "Msg") -> "None":  # noqa: UP037
        return None

    app.workflow(state=State, message=Msg, name="renamed")(handler)
    assert list(app.workflows) == ["renamed"]


def test_unannotated_parameters_are_accepted() -> None:
    app = keel.App("t")

    @app.workflow(state=State, message=Msg)
    async def plain(ctx, msg):
        return None

    assert "plain" in app.workflows


@pytest.mark.parametrize(
    ("fn_source", "message"),
    [
        ("def w(ctx, msg): return None", "must be an async function"),
        ("async def w(ctx): return None", "exactly two positional parameters"),
        ("async def w(ctx, msg, extra): return None", "exactly two positional parameters"),
        ("async def w(ctx, *, msg): return None", "exactly two positional parameters"),
        ("async def w(ctx: keel.TurnContext[State], msg: OtherMsg) -> None: return None", "message=Msg"),
        ("async def w(ctx: keel.TurnContext[OtherState], msg: Msg) -> None: return None", "state=State"),
        ("async def w(ctx: int, msg: Msg) -> None: return None", r"expected keel\.TurnContext\[State\]"),
        ("async def w(ctx, msg) -> int: return 1", "must return None"),
        ("async def w(ctx, msg: 'Missing') -> None: return None", "cannot be resolved"),
    ],
)
def test_misfit_signatures_raise_at_registration(fn_source: str, message: str) -> None:
    namespace: dict[str, Any] = {
        "keel": keel,
        "State": State,
        "Msg": Msg,
        "OtherState": OtherState,
        "OtherMsg": OtherMsg,
    }
    exec(fn_source, namespace)
    app = keel.App("t")
    with pytest.raises(keel.RegistrationError, match=message):
        app.workflow(state=State, message=Msg)(namespace["w"])
    assert app.workflows == {}


def test_models_must_be_pydantic_models() -> None:
    app = keel.App("t")
    with pytest.raises(keel.RegistrationError, match="state= must be a pydantic model"):
        app.workflow(state=dict, message=Msg)  # type: ignore[type-var]


def test_a_name_is_registered_once() -> None:
    app = keel.App("t")

    async def w(ctx: keel.TurnContext[State], msg: Msg) -> None:
        return None

    app.workflow(state=State, message=Msg)(w)
    with pytest.raises(keel.RegistrationError, match="already has a workflow named 'w'"):
        app.workflow(state=State, message=Msg)(w)


@pytest.mark.parametrize("name", ["", "a/b", "line\nbreak", "x" * 256])
def test_bad_workflow_names_are_refused(name: str) -> None:
    app = keel.App("t")

    async def w(ctx: keel.TurnContext[State], msg: Msg) -> None:
        return None

    with pytest.raises(keel.RegistrationError):
        app.workflow(state=State, message=Msg, name=name)(w)


async def test_registering_after_a_client_started_raises(memory_url: str) -> None:
    app = keel.App("t", backend=memory_url)

    @app.workflow(state=State, message=Msg)
    async def first(ctx: keel.TurnContext[State], msg: Msg) -> None:
        return None

    async with app.client():
        assert app.frozen

        async def late(ctx: keel.TurnContext[State], msg: Msg) -> None:
            return None

        with pytest.raises(keel.RegistrationError, match=r"registration belongs|at import time"):
            app.workflow(state=State, message=Msg)(late)
    assert list(app.workflows) == ["first"]


def test_backend_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_URL", raising=False)
    assert keel.App("t").backend_url == "sqlite:///keel.db"
    monkeypatch.setenv("KEEL_URL", "redis://127.0.0.1:6379/0")
    assert keel.App("t").backend_url == "redis://127.0.0.1:6379/0"
    assert keel.App("t", backend="memory://x").backend_url == "memory://x"


def test_app_names_are_checked() -> None:
    with pytest.raises(keel.InvalidKeyError, match="app name"):
        keel.App("")


def test_a_decorator_without_its_parentheses_says_what_to_write() -> None:
    app = keel.App("t")

    async def w(ctx: keel.TurnContext[State], msg: Msg) -> None:
        return None

    with pytest.raises(keel.RegistrationError, match=r"workflow 'w' needs its models: write @app\.workflow\(state="):
        app.workflow(w)  # type: ignore[arg-type]
    with pytest.raises(keel.RegistrationError, match=r"needs its models"):
        app.workflow(state=State)
    with pytest.raises(keel.RegistrationError, match=r"write @app\.on\(EventType\)"):
        app.on(w)  # type: ignore[arg-type, type-var]
    assert app.workflows == {}


class Pinged(keel.Event):
    n: int


async def test_registering_inside_a_turn_is_dead_lettered_at_once() -> None:
    # The second article's anti-pattern: a listener registered per request. The app is frozen, so it raises the
    # same way on every attempt: retrying five times with backoff would only delay the dead letter.
    app = keel.App("per-request")

    @app.workflow(state=State, message=Msg)
    async def handle(ctx: keel.TurnContext[State], msg: Msg) -> None:
        @app.on(Pinged)
        async def listener(event: Pinged, ctx: keel.HandlerContext) -> None:
            return None

    async with WorkflowTester(app) as tester:
        with pytest.raises(keel.TurnFailedError, match="RegistrationError: cannot register handler 'listener'"):
            await tester.run("handle", "r1", Msg(amount=1), timeout_s=3)
        [dead] = await tester.client.dead_letters()
        assert (dead.instance, dead.attempts) == (keel.WorkflowInstance("handle", "r1"), 1)
        [turn] = await tester.client.turns(dead.instance)
        assert turn.outcome is keel.TurnOutcome.failed


async def test_an_idempotency_conflict_inside_a_turn_is_dead_lettered_at_once() -> None:
    # A turn that sends through a client, re-using a key with another payload: the same conflict on every attempt.
    app = keel.App("conflicting")

    @app.workflow(state=State, message=Msg)
    async def handle(ctx: keel.TurnContext[State], msg: Msg) -> None:
        async with app.client() as client:
            await client.send("handle", "other", Msg(amount=msg.amount), idempotency_key="charge-1")

    async with WorkflowTester(app) as tester:
        await tester.client.send("handle", "other", Msg(amount=1), idempotency_key="charge-1")
        with pytest.raises(keel.TurnFailedError, match="IdempotencyConflictError"):
            await tester.run("handle", "r1", Msg(amount=2), timeout_s=3)
        [dead] = await tester.client.dead_letters()
        assert (dead.instance, dead.attempts) == (keel.WorkflowInstance("handle", "r1"), 1)

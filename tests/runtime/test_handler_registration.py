"""Handlers are registered once, at import time, and a signature that does not fit its event raises there (G7).

The second article's callback failed in production with "signature does not match the payload"; here the same
mistake raises ``RegistrationError`` at the decorator, naming the function and what was expected.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from pydantic import BaseModel

import keel


class Decided(keel.Event):
    loan_id: str
    approved: bool


class Cancelled(keel.Event):
    loan_id: str


class NotAnEvent(BaseModel):
    loan_id: str


def test_a_well_formed_handler_registers_under_its_function_name() -> None:
    app = keel.App("t")

    @app.on(Decided)
    async def notify(event: Decided, ctx: keel.HandlerContext) -> None:
        return None

    assert list(app.handlers) == ["notify"]
    spec = app.handlers["notify"]
    assert (spec.event_type, spec.fn, spec.workflow) == (Decided, notify, "on/notify")
    assert app.handlers_of(Decided) == [spec]
    assert app.handlers_of(Cancelled) == []
    assert app.job("on/notify") is spec


def test_string_annotations_are_resolved_and_accepted() -> None:
    # This module uses `from __future__ import annotations`, so every annotation here is a string already; the
    # explicit quotes below say so for readers, and a module-level source makes it certain.
    namespace: dict[str, Any] = {"keel": keel, "Decided": Decided}
    source = textwrap.dedent(
        """
        from __future__ import annotations
        async def notify(event: Decided, ctx: keel.HandlerContext) -> None:
            return None
        """
    )
    exec(source, namespace)
    assert namespace["notify"].__annotations__["event"] == "Decided"
    app = keel.App("t")
    app.on(Decided, name="renamed")(namespace["notify"])
    assert list(app.handlers) == ["renamed"]


def test_unannotated_parameters_and_a_base_class_annotation_are_accepted() -> None:
    app = keel.App("t")

    @app.on(Decided)
    async def plain(event, ctx):
        return None

    @app.on(Decided)
    async def broad(event: keel.Event, ctx: keel.HandlerContext) -> None:
        return None

    assert list(app.handlers) == ["plain", "broad"]


def test_several_handlers_listen_to_one_type() -> None:
    app = keel.App("t")

    @app.on(Decided)
    async def mail(event: Decided, ctx: keel.HandlerContext) -> None:
        return None

    @app.on(Decided)
    async def audit(event: Decided, ctx: keel.HandlerContext) -> None:
        return None

    assert [spec.name for spec in app.handlers_of(Decided)] == ["mail", "audit"]


@pytest.mark.parametrize(
    ("fn_source", "message"),
    [
        ("def h(event, ctx): return None", r"handler 'h' .* must be an async function: async def h\(event: Decided"),
        ("async def h(event): return None", "must take exactly two positional parameters"),
        ("async def h(event, ctx, extra): return None", "must take exactly two positional parameters"),
        ("async def h(event, *, ctx): return None", "must take exactly two positional parameters"),
        (
            "async def h(event: Cancelled, ctx: keel.HandlerContext) -> None: return None",
            "is registered for Decided but annotates its event as Cancelled",
        ),
        ("async def h(event: dict, ctx) -> None: return None", "annotates its event as dict"),
        ("async def h(event: Decided, ctx: keel.TurnContext) -> None: return None", "annotates its context as"),
        ("async def h(event, ctx) -> int: return 1", "must return None"),
        ("async def h(event: 'Missing', ctx) -> None: return None", "cannot be resolved"),
    ],
)
def test_misfit_signatures_raise_at_registration(fn_source: str, message: str) -> None:
    namespace: dict[str, Any] = {"keel": keel, "Decided": Decided, "Cancelled": Cancelled}
    exec(fn_source, namespace)
    app = keel.App("t")
    with pytest.raises(keel.RegistrationError, match=message):
        app.on(Decided)(namespace["h"])
    assert app.handlers == {}


def test_the_event_type_must_be_a_keel_event() -> None:
    app = keel.App("t")
    with pytest.raises(keel.RegistrationError, match=r"takes a keel\.Event subclass"):
        app.on(NotAnEvent)  # type: ignore[type-var]


def test_a_handler_name_is_registered_once_and_must_be_usable() -> None:
    app = keel.App("t")

    async def notify(event: Decided, ctx: keel.HandlerContext) -> None:
        return None

    app.on(Decided)(notify)
    with pytest.raises(keel.RegistrationError, match="already has a handler named 'notify'; pass name="):
        app.on(Cancelled)(notify)  # type: ignore[arg-type]
    for bad in ("", "a/b", "x" * 256):
        with pytest.raises(keel.RegistrationError):
            app.on(Decided, name=bad)(notify)


def test_two_event_types_with_one_name_are_refused() -> None:
    app = keel.App("t")

    @app.on(Decided)
    async def first(event: Decided, ctx: keel.HandlerContext) -> None:
        return None

    class Decided2(keel.Event):
        loan_id: str

    Decided2.__name__ = "Decided"

    async def second(event: Decided2, ctx: keel.HandlerContext) -> None:
        return None

    with pytest.raises(keel.RegistrationError, match="two event types are named 'Decided'"):
        app.on(Decided2)(second)


async def test_registering_a_handler_after_the_app_started_raises(memory_url: str) -> None:
    app = keel.App("t", backend=memory_url)

    @app.on(Decided)
    async def early(event: Decided, ctx: keel.HandlerContext) -> None:
        return None

    async with app.client():

        async def late(event: Decided, ctx: keel.HandlerContext) -> None:
            return None

        with pytest.raises(keel.RegistrationError, match=r"cannot register handler 'late'.*at import time"):
            app.on(Decided)(late)
    assert list(app.handlers) == ["early"]


def test_unknown_handlers_are_named_with_the_registered_ones() -> None:
    app = keel.App("t")

    @app.on(Decided)
    async def notify(event: Decided, ctx: keel.HandlerContext) -> None:
        return None

    with pytest.raises(keel.UnknownWorkflowError, match="on/notify"):
        app.job("on/missing")
    with pytest.raises(keel.UnknownWorkflowError):
        app.handler("missing")
    assert app.handler("on/notify") is app.handler("notify")

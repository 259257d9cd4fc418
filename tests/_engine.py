"""Helpers for every engine-level test (tests/conformance and tests/backends/*): one way to name instances, send,
claim, commit, fail, record steps, build events and open backends, so that no test file carries its own copy.

Everything here talks to a backend through the contract in ``keel.backends.base``; nothing knows an engine.
Instances belong to app ``APP`` and workflow ``loan`` unless told otherwise; the worker is ``w1``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from keel.backends import open_backend
from keel.backends.base import (
    Claim,
    InstanceKind,
    InstanceRef,
    NewEvent,
    NewMessage,
    StepRecord,
    StoreOptions,
    TurnCommit,
    TurnFailure,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection

    from keel.backends.base import Backend

#: The app every instance of the engine-level tests belongs to.
APP = "loans"

#: The lease a claim asks for unless told otherwise: long enough never to expire by accident.
LEASE_S = 5.0

#: What a failed attempt reports unless told otherwise.
FLAKY = "RuntimeError: flaky"


# --- Backends ------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Backend]:
    """A backend of its own on ``url`` (its own connections, as another process would have), closed at the end."""
    backend = await open_backend(url, StoreOptions())
    try:
        yield backend
    finally:
        await backend.aclose()


async def timed_wait(backend: Backend, timeout_s: float, app: str = APP) -> float:
    """How long ``wait_for_work`` took to return, in seconds."""
    started = time.monotonic()
    await backend.wait_for_work(app, timeout_s=timeout_s)
    return time.monotonic() - started


# --- Instances and messages ----------------------------------------------------------------------------------


def ref(workflow_id: str = "42", workflow: str = "loan", app: str = APP) -> InstanceRef:
    return InstanceRef(app, workflow, workflow_id)


def delivery_ref(handler: str, event_id: str, app: str = APP) -> InstanceRef:
    """The instance holding ``handler``'s delivery of event ``event_id``."""
    return InstanceRef(app, f"on/{handler}", event_id)


def new_message(
    instance: InstanceRef,
    payload: object = None,
    key: str | None = None,
    *,
    delay_s: float = 0.0,
    message_id: str = "",
) -> NewMessage:
    """A message with ``payload`` as JSON (``{}`` when not given), under a fresh id unless one is given."""
    body = json.dumps({} if payload is None else payload)
    return NewMessage(instance, message_id or uuid.uuid4().hex, body, key, delay_s)


async def send(
    backend: Backend,
    instance: InstanceRef,
    payload: object = None,
    key: str | None = None,
    *,
    delay_s: float = 0.0,
    message_id: str = "",
) -> str:
    """Send ``new_message(...)``; the id the backend returns."""
    return await backend.send(new_message(instance, payload, key, delay_s=delay_s, message_id=message_id))


# --- Claims and what a turn writes ---------------------------------------------------------------------------


async def claim_all(
    backend: Backend,
    workflows: Collection[str] = ("loan",),
    *,
    worker: str = "w1",
    lease_s: float = LEASE_S,
    limit: int = 10,
) -> list[Claim]:
    return await backend.claim(APP, workflows, worker=worker, lease_s=lease_s, limit=limit)


async def claim_one(
    backend: Backend, workflows: Collection[str] = ("loan",), *, worker: str = "w1", lease_s: float = LEASE_S
) -> Claim:
    """Claim with a limit of one, expecting exactly one claim."""
    claims = await claim_all(backend, workflows, worker=worker, lease_s=lease_s, limit=1)
    assert len(claims) == 1, claims
    return claims[0]


def commit_of(
    claim: Claim,
    state: object = None,
    worker: str = "w1",
    *,
    sends: tuple[NewMessage, ...] = (),
    events: tuple[NewEvent, ...] = (),
) -> TurnCommit:
    """A commit of ``state`` as JSON (``{}`` when not given); ``ack_of`` commits no state."""
    return TurnCommit(claim, json.dumps({} if state is None else state), worker, datetime.now(UTC), 0.01, sends, events)


def ack_of(
    claim: Claim, worker: str = "w1", *, sends: tuple[NewMessage, ...] = (), events: tuple[NewEvent, ...] = ()
) -> TurnCommit:
    """A handler delivery's acknowledgement: a commit that writes no state."""
    return TurnCommit(claim, None, worker, datetime.now(UTC), 0.01, sends, events)


def failure_of(claim: Claim, error: str = FLAKY, worker: str = "w1") -> TurnFailure:
    return TurnFailure(claim, error, worker, datetime.now(UTC), 0.01)


def step_of(claim: Claim, name: str, result: object = 1, worker: str = "w1") -> StepRecord:
    return StepRecord(claim, name, json.dumps(result), worker, 0.01)


# --- Events --------------------------------------------------------------------------------------------------


def new_event(
    handlers: tuple[str, ...] = ("mail",),
    *,
    event_id: str = "",
    key: str | None = None,
    source: Claim | None = None,
    payload: object = None,
    type: str = "Shipped",
) -> NewEvent:
    """An event of ``APP`` with one delivery per handler (message id ``EVENT_ID-HANDLER``), emitted by the turn of
    ``source`` when given, else published."""
    event_id = event_id or uuid.uuid4().hex
    body = json.dumps({"order": "o1"} if payload is None else payload)
    deliveries = tuple(
        NewMessage(
            delivery_ref(h, event_id), f"{event_id}-{h}", json.dumps({"event_id": event_id}), kind=InstanceKind.delivery
        )
        for h in handlers
    )
    return NewEvent(
        APP,
        event_id,
        type,
        body,
        handlers,
        deliveries,
        None if source is None else source.instance,
        None if source is None else source.message_id,
        key,
    )


async def claim_deliveries(backend: Backend, handler: str = "mail", *, limit: int = 10) -> list[Claim]:
    """Claim ``handler``'s deliveries."""
    return await claim_all(backend, (f"on/{handler}",), limit=limit)

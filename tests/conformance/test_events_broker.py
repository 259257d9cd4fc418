"""The broker's events contract (the outbox in a commit, publish, the event log, deliveries), on every engine.

A delivery is an ordinary message to instance ``on/HANDLER`` / ``EVENT_ID``: leased, fenced, retried and
dead-lettered like any turn. What is new here is that a commit carries sends and events, that a commit may write
no state (a handler's acknowledgement), and that events are logged, deduplicated and pruned.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import (
    Backend,
    Claim,
    InstanceKind,
    InstanceRef,
    MessageStatus,
    NewEvent,
    NewMessage,
    StoreOptions,
    TurnCommit,
    TurnFailure,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

APP = "shop"
LEASE_S = 5.0


@pytest.fixture
async def backend(backend_url: str) -> AsyncIterator[Backend]:
    opened = await open_backend(backend_url, StoreOptions())
    try:
        yield opened
    finally:
        await opened.aclose()


def ref(workflow_id: str = "o1", workflow: str = "order") -> InstanceRef:
    return InstanceRef(APP, workflow, workflow_id)


def delivery_ref(handler: str, event_id: str) -> InstanceRef:
    return InstanceRef(APP, f"on/{handler}", event_id)


def new_message(instance: InstanceRef, payload: object, *, key: str | None = None, delay_s: float = 0.0) -> NewMessage:
    return NewMessage(instance, uuid.uuid4().hex, json.dumps(payload), key, delay_s)


def new_event(
    handlers: tuple[str, ...] = ("mail", "audit"),
    *,
    event_id: str | None = None,
    key: str | None = None,
    source: InstanceRef | None = None,
    source_message_id: str | None = None,
    payload: object = None,
) -> NewEvent:
    event_id = event_id or uuid.uuid4().hex
    body = json.dumps(payload if payload is not None else {"order": "o1"})
    deliveries = tuple(
        NewMessage(
            delivery_ref(h, event_id), f"{event_id}-{h}", json.dumps({"event_id": event_id}), kind=InstanceKind.delivery
        )
        for h in handlers
    )
    return NewEvent(APP, event_id, "Shipped", body, handlers, deliveries, source, source_message_id, key)


async def claim_all(backend: Backend, workflows: tuple[str, ...], *, limit: int = 50) -> list[Claim]:
    return await backend.claim(APP, workflows, worker="w1", lease_s=LEASE_S, limit=limit)


async def claim_one(backend: Backend, workflows: tuple[str, ...] = ("order",)) -> Claim:
    claims = await claim_all(backend, workflows, limit=1)
    assert len(claims) == 1, claims
    return claims[0]


def commit_of(
    claim: Claim,
    state: object = None,
    *,
    sends: tuple[NewMessage, ...] = (),
    events: tuple[NewEvent, ...] = (),
) -> TurnCommit:
    state_json = None if state is None else json.dumps(state)
    return TurnCommit(claim, state_json, "w1", datetime.now(UTC), 0.01, sends, events)


async def test_a_commit_sends_its_messages_with_the_state(backend: Backend) -> None:
    await backend.send(new_message(ref(), {"n": 1}))
    claim = await claim_one(backend)
    first, second = new_message(ref("o2"), {"n": 2}), new_message(ref("o3"), {"n": 3}, key="k")
    assert await backend.commit_turn(commit_of(claim, {"n": 1}, sends=(first, second))) == 1

    claims = await claim_all(backend, ("order",))
    assert sorted((c.instance.workflow_id, json.loads(c.payload_json)["n"]) for c in claims) == [("o2", 2), ("o3", 3)]
    assert {c.message_id for c in claims} == {first.message_id, second.message_id}
    info = await backend.message(APP, first.message_id)
    assert info is not None
    assert info.status is MessageStatus.pending


async def test_a_commits_sends_are_deduplicated_like_send(backend: Backend) -> None:
    """A send whose id or idempotency key is already known appends nothing (a rerun of the same outbox)."""
    await backend.send(new_message(ref(), {"n": 1}))
    claim = await claim_one(backend)
    earlier = await backend.send(new_message(ref("o2"), {"n": 0}, key="once"))
    again = new_message(ref("o2"), {"n": 99}, key="once")
    await backend.commit_turn(commit_of(claim, {"n": 1}, sends=(again,)))

    claims = await claim_all(backend, ("order",))
    assert [c.message_id for c in claims] == [earlier]
    assert await backend.message(APP, again.message_id) is None


async def test_a_commits_delayed_send_waits_for_its_time(backend: Backend) -> None:
    await backend.send(new_message(ref(), {"n": 1}))
    claim = await claim_one(backend)
    await backend.commit_turn(commit_of(claim, {}, sends=(new_message(ref("later"), {}, delay_s=0.6),)))
    assert await claim_all(backend, ("order",)) == []
    await asyncio.sleep(0.8)
    assert [c.instance.workflow_id for c in await claim_all(backend, ("order",))] == ["later"]


async def test_a_commit_appends_its_events_and_their_deliveries(backend: Backend) -> None:
    await backend.send(new_message(ref(), {"n": 1}))
    claim = await claim_one(backend)
    event = new_event(source=claim.instance, source_message_id=claim.message_id, payload={"order": "o1", "n": 7})
    await backend.commit_turn(commit_of(claim, {"n": 1}, events=(event,)))

    [row] = await backend.events(APP, limit=10)
    assert (row.event_id, row.type, json.loads(row.payload_json)) == (
        event.event_id,
        "Shipped",
        {"order": "o1", "n": 7},
    )
    assert row.handlers == ("mail", "audit")
    assert row.source == claim.instance
    assert row.source_message_id == claim.message_id
    assert row.idempotency_key is None
    assert row.published_at.tzinfo is not None
    assert abs((row.published_at - datetime.now(UTC)).total_seconds()) < 60

    claims = await claim_all(backend, ("on/mail", "on/audit"))
    assert sorted(c.instance.workflow for c in claims) == ["on/audit", "on/mail"]
    assert {c.instance.workflow_id for c in claims} == {event.event_id}
    assert {c.message_id for c in claims} == {d.message_id for d in event.deliveries}
    assert all(c.state_json is None and c.state_version == 0 and c.attempt == 1 for c in claims)


async def test_a_commit_under_a_lost_lease_sends_and_emits_nothing(backend: Backend) -> None:
    await backend.send(new_message(ref(), {"n": 1}))
    claim = await claim_one(backend)
    await backend.release(claim)
    with pytest.raises(keel.LeaseLostError):
        await backend.commit_turn(
            commit_of(claim, {"n": 1}, sends=(new_message(ref("o2"), {}),), events=(new_event(),))
        )
    assert await backend.events(APP, limit=10) == []
    assert [c.instance.workflow_id for c in await claim_all(backend, ("order", "on/mail", "on/audit"))] == ["o1"]


async def test_a_commit_without_state_acknowledges_a_delivery(backend: Backend) -> None:
    event = new_event(("mail",))
    await backend.publish(event)
    claim = await claim_one(backend, ("on/mail",))
    follow_up = new_message(ref("o9"), {"from": "handler"})
    assert await backend.commit_turn(commit_of(claim, None, sends=(follow_up,))) == 0

    info = await backend.message(APP, claim.message_id)
    assert info is not None
    assert (info.status, info.state_version) == (MessageStatus.done, 0)
    assert await backend.state(claim.instance) is None
    [turn] = await backend.turns(claim.instance, limit=5)
    assert (turn.outcome, turn.version_read, turn.version_written) == ("committed", 0, 0)
    # Acknowledged: never delivered again. The handler's send went out with it.
    assert [c.message_id for c in await claim_all(backend, ("on/mail", "order"))] == [follow_up.message_id]


async def test_a_failed_delivery_is_retried_then_dead_lettered_and_resolved_like_a_turn(backend: Backend) -> None:
    event = new_event(("mail",))
    await backend.publish(event)
    claim = await claim_one(backend, ("on/mail",))
    await backend.retry_turn(TurnFailure(claim, "boom", "w1", datetime.now(UTC), 0.01), delay_s=0.0)
    again = await claim_one(backend, ("on/mail",))
    assert (again.message_id, again.attempt) == (claim.message_id, 2)
    await backend.fail_turn(TurnFailure(again, "Traceback...\nValueError: bad", "w1", datetime.now(UTC), 0.01))

    [dead] = await backend.dead_letters(APP, limit=10)
    assert (dead.instance, dead.message_id) == (delivery_ref("mail", event.event_id), claim.message_id)
    assert await claim_all(backend, ("on/mail",)) == []
    assert await backend.resolve_dead_letter(dead.instance, skip=False) == claim.message_id
    assert (await claim_one(backend, ("on/mail",))).attempt == 1


async def test_publish_appends_an_event_once_per_idempotency_key(backend: Backend) -> None:
    first = new_event(key="order-o1-shipped")
    assert await backend.publish(first) == first.event_id
    second = new_event(key="order-o1-shipped")
    assert await backend.publish(second) == first.event_id
    assert await backend.publish(first) == first.event_id  # the same event again: nothing new either

    assert [row.event_id for row in await backend.events(APP, limit=10)] == [first.event_id]
    assert len(await claim_all(backend, ("on/mail", "on/audit"))) == 2
    [row] = await backend.events(APP, limit=10)
    assert (row.idempotency_key, row.source, row.source_message_id) == ("order-o1-shipped", None, None)


async def test_a_published_event_id_already_in_the_log_appends_nothing(backend: Backend) -> None:
    await backend.send(new_message(ref(), {}))
    claim = await claim_one(backend)
    event = new_event(("mail",))
    await backend.publish(event)
    await backend.commit_turn(commit_of(claim, {}, events=(event,)))
    assert len(await backend.events(APP, limit=10)) == 1
    assert len(await claim_all(backend, ("on/mail",))) == 1


async def test_an_event_without_handlers_is_logged(backend: Backend) -> None:
    event = new_event(())
    await backend.publish(event)
    [row] = await backend.events(APP, limit=10)
    assert (row.event_id, row.handlers) == (event.event_id, ())


async def test_events_are_listed_newest_first(backend: Backend) -> None:
    published = [new_event((), payload={"i": i}) for i in range(5)]
    for event in published:
        await backend.publish(event)
    rows = await backend.events(APP, limit=3)
    assert [row.event_id for row in rows] == [e.event_id for e in reversed(published)][:3]
    assert rows[0].seq > rows[1].seq > rows[2].seq
    assert await backend.events("another-app", limit=10) == []


async def test_publish_and_a_commit_that_sends_wake_idle_workers(backend: Backend) -> None:
    async def publish_soon() -> None:
        await asyncio.sleep(0.2)
        await backend.publish(new_event(("mail",)))

    publisher = asyncio.create_task(publish_soon())
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=10)
    assert time.monotonic() - started < 2.0
    await publisher

    await backend.send(new_message(ref(), {}))
    claim = await claim_one(backend)

    async def commit_soon() -> None:
        await asyncio.sleep(0.2)
        await backend.commit_turn(commit_of(claim, {}, sends=(new_message(ref("o2"), {}),)))

    committer = asyncio.create_task(commit_soon())
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=10)
    assert time.monotonic() - started < 2.0
    await committer


async def test_prune_removes_old_events_and_finished_deliveries_whole(backend: Backend) -> None:
    done_event, keyed_event, dead_event = new_event(("mail",)), new_event(("mail",), key="k1"), new_event(("mail",))
    for event in (done_event, keyed_event, dead_event):
        await backend.publish(event)
    claims = {c.instance.workflow_id: c for c in await claim_all(backend, ("on/mail",))}
    await backend.commit_turn(commit_of(claims[done_event.event_id]))
    await backend.commit_turn(commit_of(claims[keyed_event.event_id]))
    failure = TurnFailure(claims[dead_event.event_id], "boom", "w1", datetime.now(UTC), 0.01)
    await backend.fail_turn(failure)
    await backend.send(new_message(ref(), {}))
    user_claim = await claim_one(backend)
    await backend.commit_turn(commit_of(user_claim, {"n": 1}))

    soon = datetime.now(UTC) + timedelta(seconds=5)
    pruned = await backend.prune(APP, finished_before=soon, keys_before=soon - timedelta(days=7))
    # Events: the unkeyed two go, the recently keyed one stays. Messages: two deliveries and the user's one.
    assert (pruned.events, pruned.messages) == (2, 3)
    assert [row.event_id for row in await backend.events(APP, limit=10)] == [keyed_event.event_id]
    assert await backend.publish(new_event(key="k1")) == keyed_event.event_id
    # A finished delivery's instance is gone whole; the dead one's stays, and so does the user's instance.
    assert not await backend.delete_instance(delivery_ref("mail", done_event.event_id))
    assert await backend.turns(delivery_ref("mail", keyed_event.event_id), limit=5) == []
    assert len(await backend.dead_letters(APP, limit=10)) == 1
    assert await backend.resolve_dead_letter(delivery_ref("mail", dead_event.event_id), skip=True) is not None
    state = await backend.state(ref())
    assert state is not None
    assert state.version == 1

    pruned = await backend.prune(APP, finished_before=soon, keys_before=soon)
    assert (pruned.events, pruned.messages) == (1, 1)
    assert await backend.events(APP, limit=10) == []
    assert await backend.publish(new_event(key="k1")) != keyed_event.event_id  # past its window, the key is free


async def test_prune_keeps_recent_events_and_pending_deliveries(backend: Backend) -> None:
    event = new_event(("mail",))
    await backend.publish(event)
    past = datetime.now(UTC) - timedelta(hours=1)
    pruned = await backend.prune(APP, finished_before=past, keys_before=past)
    assert (pruned.events, pruned.messages) == (0, 0)
    soon = datetime.now(UTC) + timedelta(seconds=5)
    pruned = await backend.prune(APP, finished_before=soon, keys_before=soon)
    assert (pruned.events, pruned.messages) == (1, 0)
    # The event row is gone from the log, but its undelivered delivery still runs: it carries its own payload.
    assert [c.instance.workflow_id for c in await claim_all(backend, ("on/mail",))] == [event.event_id]

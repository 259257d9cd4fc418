"""The event log's deduplication and the pruning of deliveries, through several backends, on every engine (G5)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from keel.backends.base import NewMessage
from tests._engine import (
    APP,
    ack_of,
    claim_all,
    claim_deliveries,
    claim_one,
    commit_of,
    delivery_ref,
    failure_of,
    new_event,
    ref,
    send,
    step_of,
)

if TYPE_CHECKING:
    from keel.backends.base import Backend


def soon() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=5)


async def test_concurrent_publishes_of_one_key_append_one_event_and_its_deliveries(
    backend: Backend, other: Backend
) -> None:
    events = [new_event(("mail", "audit"), key="once") for _ in range(10)]
    ids = await asyncio.gather(*((backend if n % 2 else other).publish(e) for n, e in enumerate(events)))
    assert len(set(ids)) == 1
    assert [row.event_id for row in await backend.events(APP, limit=20)] == ids[:1]
    claimed = await claim_all(backend, ("on/mail", "on/audit"), limit=50)
    assert sorted(c.message_id for c in claimed) == [f"{ids[0]}-audit", f"{ids[0]}-mail"]  # only the appended one's


async def test_a_commits_events_with_a_used_key_or_id_append_nothing_of_theirs(
    backend: Backend,
) -> None:
    await send(backend, ref())
    claim = await claim_one(backend)
    events = (
        new_event(("mail",), event_id="e1", key="k"),
        new_event(("mail", "audit"), event_id="e2", key="k"),  # the key again: skipped, deliveries and all
        new_event(("mail",), event_id="e1"),  # the id again: skipped
        new_event(("audit",), event_id="e3"),  # and what comes after them still appended
    )
    await backend.commit_turn(commit_of(claim, {}, events=events, sends=(NewMessage(ref("b"), "m-b", "{}"),)))
    assert [row.event_id for row in await backend.events(APP, limit=10)] == ["e3", "e1"]
    claimed = await claim_all(backend, ("loan", "on/mail", "on/audit"))
    assert sorted(c.message_id for c in claimed) == ["e1-mail", "e3-audit", "m-b"]
    assert not await backend.delete_instance(delivery_ref("audit", "e2"))  # no instance was made for it


async def test_prune_removes_a_finished_delivery_whole_and_keeps_a_running_one(backend: Backend) -> None:
    event = new_event(("mail", "audit"))
    await backend.publish(event)
    [mail] = await claim_deliveries(backend, "mail")
    await backend.record_step(step_of(mail, "smtp", "ok"))
    await backend.commit_turn(ack_of(mail))
    [audit] = await claim_deliveries(backend, "audit")  # still running: kept
    await send(backend, ref())
    await backend.commit_turn(commit_of(await claim_one(backend), {"n": 1}))
    pruned = await backend.prune(APP, finished_before=soon(), keys_before=soon())
    # How many turn records a delivery removed whole counts for differs by engine (see the engine folders).
    assert (pruned.messages, pruned.events) == (2, 1)
    assert await backend.turns(ref(), limit=5) == []
    assert not await backend.delete_instance(mail.instance)  # gone whole
    assert await backend.turns(mail.instance, limit=5) == []
    state = await backend.state(ref())
    assert state is not None and state.version == 1  # the workflow's instance keeps its state
    await backend.release(audit)
    assert [c.instance.workflow_id for c in await claim_deliveries(backend, "audit")] == [event.event_id]


async def test_prune_removes_a_skipped_delivery_whole_too(backend: Backend) -> None:
    await backend.publish(new_event(event_id="e1"))
    await backend.commit_turn(ack_of(await claim_one(backend, ("on/mail",))))
    await backend.publish(new_event(event_id="e2"))
    failed = await claim_one(backend, ("on/mail",))
    await backend.fail_turn(failure_of(failed))
    await backend.resolve_dead_letter(failed.instance, skip=True)
    pruned = await backend.prune(APP, finished_before=soon(), keys_before=soon())
    assert (pruned.messages, pruned.events) == (2, 2)
    for event_id in ("e1", "e2"):
        assert not await backend.delete_instance(delivery_ref("mail", event_id))
    assert await backend.events(APP, limit=5) == []

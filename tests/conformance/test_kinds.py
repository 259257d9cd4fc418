"""What an instance holds, a workflow's turns or a handler's delivery, on every engine.

Engines store the kind each instance's first message carries (``NewMessage.kind``; ``keel.events`` sets it for
deliveries, the one place above the engines that builds them) and go by that, never by the instance's name: prune
removes a finished delivery whole and keeps a workflow instance's row, so its fencing tokens go on rising.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from pydantic import BaseModel

import keel
from keel.backends.base import InstanceKind, InstanceRef, NewMessage, TurnCommit

if TYPE_CHECKING:
    from keel.backends.base import Backend

APP = "kinds"


class Note(BaseModel):
    text: str = ""


class Noted(keel.Event):
    text: str


async def _run_one(backend: Backend, app: str, instance: InstanceRef, kind: InstanceKind) -> int:
    """Send one message of ``kind`` to ``instance``, claim and commit it without state; return the claim's token."""
    await backend.send(NewMessage(instance, uuid.uuid4().hex, "{}", kind=kind))
    [claim] = await backend.claim(app, [instance.workflow], worker="w1", lease_s=5, limit=1)
    assert claim.instance == instance
    await backend.commit_turn(TurnCommit(claim, None, "w1", datetime.now(UTC), 0.01))
    return claim.fencing_token


def _soon() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=5)


# The second pair swaps the names: the engine must go by the stored kind, whatever the instance is called.
@pytest.mark.parametrize(("delivery_name", "workflow_name"), [("on/mail", "order"), ("order", "on/mail")])
async def test_prune_removes_a_delivery_whole_and_keeps_a_workflow_instances_token_floor(
    backend: Backend, delivery_name: str, workflow_name: str
) -> None:
    delivery = InstanceRef(APP, delivery_name, "e1")
    workflow = InstanceRef(APP, workflow_name, "o1")
    # The same history for both: one message, claimed under token 1, committed without state.
    assert await _run_one(backend, APP, delivery, InstanceKind.delivery) == 1
    assert await _run_one(backend, APP, workflow, InstanceKind.workflow) == 1

    pruned = await backend.prune(APP, finished_before=_soon(), keys_before=_soon())
    assert pruned.messages == 2
    assert await backend.turns(delivery, limit=5) == []
    assert await backend.turns(workflow, limit=5) == []
    # The delivery is gone whole: there is no instance left to delete.
    assert not await backend.delete_instance(delivery)
    # The workflow instance kept its row: a send after the prune is claimed under a higher token.
    assert await _run_one(backend, APP, workflow, InstanceKind.workflow) == 2


async def test_a_published_events_deliveries_are_stored_as_deliveries(backend_url: str, backend: Backend) -> None:
    app = keel.App(f"kinds-{uuid.uuid4().hex[:8]}", backend=backend_url)

    @app.on(Noted)
    async def mail(event: Noted, ctx: keel.HandlerContext) -> None:
        return None

    async with app.client() as client:
        event_id = await client.publish(Noted(text="hi"))
    [claim] = await backend.claim(app.name, ["on/mail"], worker="w1", lease_s=5, limit=1)
    assert (claim.instance.workflow, claim.instance.workflow_id) == ("on/mail", event_id)
    await backend.commit_turn(TurnCommit(claim, None, "w1", datetime.now(UTC), 0.01))
    pruned = await backend.prune(app.name, finished_before=_soon(), keys_before=_soon())
    assert pruned.messages == 1
    assert not await backend.delete_instance(claim.instance)


async def test_no_workflow_can_be_named_or_sent_to_as_a_delivery(backend_url: str, backend: Backend) -> None:
    app = keel.App(f"kinds-{uuid.uuid4().hex[:8]}", backend=backend_url)

    async def turn(ctx: keel.TurnContext[Note], msg: Note) -> None:
        return None

    with pytest.raises(keel.RegistrationError, match="must not contain '/'"):
        app.workflow(state=Note, message=Note, name="on/mail")(turn)

    @app.on(Noted)
    async def mail(event: Noted, ctx: keel.HandlerContext) -> None:
        return None

    async with app.client() as client:
        with pytest.raises(keel.UnknownWorkflowError, match="on/mail"):
            await client.send("on/mail", "e1", Note())
    # Nothing was stored: no delivery instance appeared under that name.
    assert await backend.claim(app.name, ["on/mail"], worker="w1", lease_s=5, limit=10) == []
    assert not await backend.delete_instance(InstanceRef(app.name, "on/mail", "e1"))

"""What the runtime commands (``keel send``, ``state``, ``dead``, ``retry``, ``skip``, ``trace``, ``events``) do.

Each is a function returning the text to print, so the CLI stays a thin layer of options over them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from keel.backends._url import mask_password
from keel.errors import InstanceNotFoundError
from keel.payload import coerce
from keel.records import HandlerDelivery, WorkflowInstance

if TYPE_CHECKING:
    from keel.app import App
    from keel.events import EventInfo
    from keel.records import DeadLetter, Target, TurnRecord


async def send_message(
    app: App,
    url: str | None,
    workflow: str,
    workflow_id: str,
    payload: Any,
    idempotency_key: str | None,
    wait_s: float | None,
    *,
    delay_s: float = 0.0,
) -> str:
    """Send ``payload``; return the message id, or with ``wait_s`` the id and the state its turn committed."""
    async with app.client(url=url) as client:
        message_id = await client.send(workflow, workflow_id, payload, idempotency_key=idempotency_key, delay_s=delay_s)
        if wait_s is None:
            return message_id
        await client.wait(workflow, workflow_id, message_id, timeout_s=wait_s)
        return f"{message_id}\n{await _state_text(client, workflow, workflow_id)}"


async def publish_event(
    app: App, url: str | None, type_name: str, payload: Any, idempotency_key: str | None, wait_s: float | None
) -> str:
    """Publish an event of the type named ``type_name``; return its id, after its handlers ran with ``wait_s``.

    Raises:
        UnknownWorkflowError: No handler of the app takes an event type of that name.
        PayloadValidationError: The payload does not fit the event type; the error names the field.
    """
    event_type = app.event_type(type_name)
    event = coerce(payload, event_type, what=f"event {type_name}")
    async with app.client(url=url) as client:
        event_id = await client.publish(event, idempotency_key=idempotency_key)
        if wait_s is not None:
            await client.wait_event(event_id, timeout_s=wait_s)
    return event_id


async def read_state(app: App, url: str | None, workflow: str, workflow_id: str) -> str:
    """Return the instance's state and version as JSON text.

    Raises:
        InstanceNotFoundError: No turn of the instance has committed yet.
    """
    async with app.client(url=url) as client:
        return await _state_text(client, workflow, workflow_id)


async def _state_text(client: Any, workflow: str, workflow_id: str) -> str:
    current = await client.state(workflow, workflow_id)
    if current is None:
        raise InstanceNotFoundError(workflow, workflow_id)
    document = {
        "workflow": workflow,
        "workflow_id": workflow_id,
        "version": current.version,
        "written_at": current.written_at.isoformat(),
        "writer": current.writer,
        "state": current.value.model_dump(mode="json"),
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


async def list_dead_letters(app: App, url: str | None, limit: int, *, app_path: str = "MODULE:APP") -> str:
    """Return the app's dead letters, newest first, one block each, with the last line of their error.

    Args:
        app: The app.
        url: The backend URL, or None for the app's.
        limit: How many dead letters, at most.
        app_path: How the command line named the app, for the ``keel retry`` command each block shows.
    """
    async with app.client(url=url) as client:
        letters = await client.dead_letters(limit=limit)
    if not letters:
        return "no dead letters"
    return "\n\n".join(_dead_letter_block(letter, app_path, url) for letter in letters)


def command_args(target: Target) -> str:
    """Return how the command line names ``target``: ``WORKFLOW WORKFLOW_ID``, or ``--handler NAME EVENT_ID``."""
    if isinstance(target, HandlerDelivery):
        return f"--handler {target.handler} {target.event_id}"
    return f"{target.workflow} {target.workflow_id}"


def _dead_letter_block(letter: DeadLetter, app_path: str, url: str | None) -> str:
    target = letter.instance
    lines = letter.error.strip().splitlines() or ["(no error text)"]
    what = (
        f"handler {target.handler}  event {target.event_id}"
        if isinstance(target, HandlerDelivery)
        else f"{target.workflow} {target.workflow_id}"
    )
    # A typed password must not end up in output that gets pasted into tickets: the user puts it back.
    where = "" if url is None else f" --url {mask_password(url)}"
    return (
        f"{what}  message {letter.message_id}\n"
        f"  failed at {letter.failed_at.isoformat(timespec='seconds')} after {letter.attempts} attempt(s)\n"
        f"  {lines[-1]}\n"
        f"  keel retry {app_path} {command_args(target)}{where} runs it again; keel skip drops it"
    )


async def resolve_dead_letter(app: App, url: str | None, target: Target, *, skip: bool) -> str:
    """Retry or skip the dead letter pausing an instance (or a handler's delivery); return what was done."""
    async with app.client(url=url) as client:
        if skip:
            message_id = await client.skip(target)
        else:
            message_id = await client.retry(target)
    if isinstance(target, HandlerDelivery):
        if skip:
            return f"skipped message {message_id}; event {target.event_id} will not reach handler {target.handler}"
        return f"event {target.event_id} will be delivered to handler {target.handler} again"
    if skip:
        return f"skipped message {message_id}; {target.workflow} {target.workflow_id} goes on with its next message"
    instance = f"{target.workflow} {target.workflow_id}"
    return f"message {message_id} of {instance} will run again, before the messages after it"


async def trace(app: App, url: str | None, target: Target, limit: int, *, as_json: bool) -> str:
    """Rebuild an instance's (or a delivery's) timeline from the backend: its turns, oldest first."""
    async with app.client(url=url) as client:
        turns = await client.turns(target, limit=limit)
        current = None
        if turns and isinstance(target, WorkflowInstance):
            current = await client.state(target.workflow, target.workflow_id)
    if as_json:
        return json.dumps([_turn_document(t) for t in turns], indent=2, ensure_ascii=False)
    title, version = _title(target), ""
    if isinstance(target, WorkflowInstance):
        version = ", no committed state" if current is None else f", state version {current.version}"
    if not turns:
        return f"{title}: no turn recorded (never sent to, pruned, or deleted)"
    lines = [f"{title}: {len(turns)} turn record(s){version}"]
    for turn in turns:
        lines.append(
            f"{turn.started_at.isoformat(timespec='milliseconds')}  {turn.outcome:<9}  "
            f"message {turn.message_id}  attempt {turn.attempt}  token {turn.fencing_token}  "
            f"{_versions(turn)}{turn.duration_s:.3f}s  worker {turn.worker}"
        )
        if turn.error:
            lines.append(f"    {_last_line(turn.error)}")
    return "\n".join(lines)


def _title(target: Target) -> str:
    if isinstance(target, HandlerDelivery):
        return f"handler {target.handler} on event {target.event_id}"
    return f"{target.workflow} {target.workflow_id}"


def _versions(turn: TurnRecord) -> str:
    if turn.version_read is None:
        return ""  # a delivery: no state to read or write
    written = "-" if turn.version_written is None else f"v{turn.version_written}"
    return f"v{turn.version_read} -> {written}  "


async def list_events(app: App, url: str | None, limit: int, *, as_json: bool) -> str:
    """Return the app's recent events, newest first, each with the status of its delivery to every handler."""
    async with app.client(url=url) as client:
        events = await client.events(limit=limit)
    if as_json:
        return json.dumps([_event_document(e) for e in events], indent=2, ensure_ascii=False)
    if not events:
        return "no events (none published yet, or all pruned)"
    blocks = []
    for event in events:
        source = "published by a client"
        if event.source is not None:
            source = f"emitted by {_title(event.source)}"
        lines = [f"{event.published_at.isoformat(timespec='milliseconds')}  {event.type}  {event.event_id}  {source}"]
        if not event.deliveries:
            lines.append("    no handler")
        for delivery in event.deliveries:
            status = "pruned (finished long ago)" if delivery.status is None else delivery.status.value
            error = f": {_last_line(delivery.error)}" if delivery.error else ""
            lines.append(f"    {delivery.handler:<24} {status}{error}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _event_document(event: EventInfo) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "type": event.type,
        "published_at": event.published_at.isoformat(),
        "source": None if event.source is None else _target_document(event.source),
        "source_message_id": event.source_message_id,
        "idempotency_key": event.idempotency_key,
        "payload": event.payload,
        "deliveries": {
            d.handler: {"status": None if d.status is None else d.status.value, "error": d.error}
            for d in event.deliveries
        },
    }


def _target_document(target: Target) -> dict[str, str]:
    if isinstance(target, HandlerDelivery):
        return {"handler": target.handler, "event_id": target.event_id}
    return {"workflow": target.workflow, "workflow_id": target.workflow_id}


def _turn_document(turn: TurnRecord) -> dict[str, Any]:
    return {
        "started_at": turn.started_at.isoformat(),
        "outcome": turn.outcome.value,
        "message_id": turn.message_id,
        "attempt": turn.attempt,
        "fencing_token": turn.fencing_token,
        "version_read": turn.version_read,
        "version_written": turn.version_written,
        "duration_s": turn.duration_s,
        "worker": turn.worker,
        "error": turn.error,
    }


def _last_line(error: str) -> str:
    lines = error.strip().splitlines()
    return lines[-1] if lines else ""

"""What ``keel send`` and ``keel state`` do, as functions returning the text to print."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from keel.errors import KeelError

if TYPE_CHECKING:
    from keel.app import App
    from keel.backends.base import TurnRecordRow


class InstanceNotFoundError(KeelError, LookupError):
    """Raised when a workflow instance has no committed state yet."""

    def __init__(self, workflow: str, workflow_id: str) -> None:
        self.workflow = workflow
        self.workflow_id = workflow_id
        super().__init__(
            f"instance {workflow_id!r} of workflow {workflow!r} has no committed state: no turn of it has "
            "committed yet (was a message sent, and is a worker running on this backend?)"
        )


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


async def list_dead_letters(app: App, url: str | None, limit: int) -> str:
    """Return the app's dead letters, newest first, one block each, with the last line of their error."""
    async with app.client(url=url) as client:
        letters = await client.dead_letters(limit=limit)
    if not letters:
        return "no dead letters"
    blocks = []
    for letter in letters:
        lines = letter.error.strip().splitlines() or ["(no error text)"]
        blocks.append(
            f"{letter.instance.workflow} {letter.instance.workflow_id}  message {letter.message_id}\n"
            f"  failed at {letter.failed_at.isoformat(timespec='seconds')} after {letter.attempts} attempt(s)\n"
            f"  {lines[-1]}\n"
            "  keel retry MODULE:APP WORKFLOW WORKFLOW_ID runs it again; keel skip drops it"
        )
    return "\n\n".join(blocks)


async def resolve_dead_letter(app: App, url: str | None, workflow: str, workflow_id: str, *, skip: bool) -> str:
    """Retry or skip the dead letter pausing an instance; return what was done."""
    async with app.client(url=url) as client:
        if skip:
            message_id = await client.skip(workflow, workflow_id)
            return f"skipped message {message_id}; {workflow} {workflow_id} goes on with its next message"
        message_id = await client.retry(workflow, workflow_id)
        return f"message {message_id} of {workflow} {workflow_id} will run again, before the messages after it"


async def trace(app: App, url: str | None, workflow: str, workflow_id: str, limit: int, *, as_json: bool) -> str:
    """Rebuild an instance's timeline from the backend: its turns, oldest first, and its current state version."""
    async with app.client(url=url) as client:
        turns = await client.turns(workflow, workflow_id, limit=limit)
        current = await client.state(workflow, workflow_id) if turns else None
    if as_json:
        return json.dumps([_turn_document(t) for t in turns], indent=2, ensure_ascii=False)
    if not turns:
        return f"{workflow} {workflow_id}: no turn recorded (never sent to, pruned, or deleted)"
    version = "no committed state" if current is None else f"state version {current.version}"
    lines = [f"{workflow} {workflow_id}: {len(turns)} turn record(s), {version}"]
    for turn in turns:
        written = "-" if turn.version_written is None else f"v{turn.version_written}"
        lines.append(
            f"{turn.started_at.isoformat(timespec='milliseconds')}  {turn.outcome:<9}  "
            f"message {turn.message_id}  attempt {turn.attempt}  token {turn.fencing_token}  "
            f"v{turn.version_read} -> {written}  {turn.duration_s:.3f}s  worker {turn.worker}"
        )
        if turn.error:
            lines.append(f"    {_last_line(turn.error)}")
    return "\n".join(lines)


def _turn_document(turn: TurnRecordRow) -> dict[str, Any]:
    return {
        "started_at": turn.started_at.isoformat(),
        "outcome": turn.outcome,
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

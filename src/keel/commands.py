"""What ``keel send`` and ``keel state`` do, as functions returning the text to print."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from keel.errors import KeelError

if TYPE_CHECKING:
    from keel.app import App


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
) -> str:
    """Send ``payload``; return the message id, or with ``wait_s`` the id and the state its turn committed."""
    async with app.client(url=url) as client:
        message_id = await client.send(workflow, workflow_id, payload, idempotency_key=idempotency_key)
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

"""A batch of messages for ``client.send_many``: ``keel.Outgoing``, and every item checked before anything is sent.

Each item goes through the checks of ``client.send`` (``outbox.build_message``); the first bad one fails the whole
batch, and its error (of the same class ``send`` raises) names its index, so the caller knows which to fix.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keel.errors import IdempotencyConflictError, KeelError
from keel.outbox import build_message

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from pydantic import BaseModel

    from keel.app import App
    from keel.backends.base import NewMessage


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message of a ``client.send_many`` batch: what ``client.send`` takes, as one value.

    A plain tuple of the same fields in the same order, ``(workflow, workflow_id, message)`` with the key and the
    delay optional, is taken too.
    """

    #: A registered workflow's name.
    workflow: str
    #: The instance (1-255 printable characters).
    workflow_id: str
    #: An instance of the workflow's message model, or data that validates as one.
    message: BaseModel | dict[str, Any]
    #: As ``client.send``'s: the same message again under the same key returns the first id and enqueues nothing.
    idempotency_key: str | None = None
    #: A durable timer: visible this many seconds after the batch is sent.
    delay_s: float = 0.0


def build_batch(app: App, items: Iterable[Outgoing | tuple[Any, ...]], *, max_bytes: int) -> list[NewMessage]:
    """Validate and encode every item, each under a fresh message id, in order.

    Raises:
        TypeError: An item is neither an ``Outgoing`` nor a tuple of its fields; the error names its index.
        KeelError: What ``client.send`` raises for the first bad item, its message starting ``item N of the batch``.
    """
    return [_build(app, index, item, max_bytes) for index, item in enumerate(items)]


def in_item(error: KeelError, index: int) -> KeelError:
    """``error``, its message now starting with the batch item it is about."""
    error.args = (f"item {index} of the batch: {error}", *error.args[1:])
    return error


def conflicting_index(messages: Sequence[NewMessage], error: IdempotencyConflictError) -> int | None:
    """The index of the first message whose instance and idempotency key ``error`` names, if any."""
    for index, message in enumerate(messages):
        ref = message.instance
        if message.idempotency_key == error.key and f"{ref.workflow}/{ref.workflow_id}" == error.instance:
            return index
    return None


def _build(app: App, index: int, item: Outgoing | tuple[Any, ...], max_bytes: int) -> NewMessage:
    outgoing = _outgoing(index, item)
    try:
        return build_message(
            app,
            outgoing.workflow,
            outgoing.workflow_id,
            outgoing.message,
            message_id=uuid.uuid4().hex,
            idempotency_key=outgoing.idempotency_key,
            delay_s=outgoing.delay_s,
            max_bytes=max_bytes,
        )
    except KeelError as exc:
        in_item(exc, index)
        raise


def _outgoing(index: int, item: Outgoing | tuple[Any, ...]) -> Outgoing:
    if isinstance(item, Outgoing):
        return item
    if isinstance(item, tuple) and 3 <= len(item) <= 5:
        return Outgoing(*item)
    shown = f"a tuple of {len(item)}" if isinstance(item, tuple) else f"a {type(item).__name__}"
    raise TypeError(
        f"item {index} of the batch is {shown}; send_many takes keel.Outgoing(workflow, workflow_id, message, "
        "idempotency_key=None, delay_s=0.0) items, or tuples of those 3 to 5 fields"
    )

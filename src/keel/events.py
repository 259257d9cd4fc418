"""Events: typed facts that turns emit and anyone publishes, and how one travels to its handlers.

An event is stored once in the app's log and sent, in the same transaction, as one delivery per handler of its
type: an ordinary message to the instance ``on/HANDLER`` / ``EVENT_ID``. So a delivery is leased, fenced,
retried and dead-lettered by exactly the machinery that runs turns, and ``keel dead``, ``keel retry`` and
``keel skip`` cover it. The delivery carries an envelope (the event's id, type, source and payload), so a handler
runs even after the log row was pruned.

Ids are derived, never drawn, wherever a rerun could repeat a call: an event emitted by a turn, a handler's sends
and publishes, and a delivery's message are named from the message that ran and the call's position in it. A
turn or handler that runs again after a crash therefore proposes the same ids, and the backend appends nothing
twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from keel.backends.base import InstanceKind, InstanceRef, NewEvent, NewMessage
from keel.errors import PayloadValidationError
from keel.payload import encode
from keel.records import MessageStatus, Target, delivery_workflow

if TYPE_CHECKING:
    from collections.abc import Sequence


class Event(BaseModel):
    """Base class of event types: subclass it with the fields of the fact.

    The class name is the event's type name, stored with every event; handlers are registered per type with
    ``@app.on(EventType)``.
    """


#: The namespace of keel's derived ids (uuid5): the same name gives the same id in every process.
_ID_NAMESPACE = uuid.UUID("6f2c8a1e-41b7-4d2a-9a53-0c3f6a7e9b15")


def derived_id(*parts: str) -> str:
    """Return a stable 32-character id for ``parts``: the same parts give the same id in every process."""
    return uuid.uuid5(_ID_NAMESPACE, "\x1f".join(parts)).hex


def event_type_name(event_type: type[Event]) -> str:
    """Return the type name stored with events of ``event_type``."""
    return event_type.__name__


def delivery_message_id(event_id: str, handler: str) -> str:
    """Return the message id of ``event_id``'s delivery to ``handler``."""
    return derived_id("delivery", event_id, handler)


def handler_idempotency_key(event_id: str, handler: str) -> str:
    """Return the key a handler passes to outside systems: the same on every redelivery of one event."""
    return f"{handler}:{event_id}"


@dataclass(frozen=True)
class Envelope:
    """An event as a handler receives it: its identity and source, and its payload still as JSON."""

    event_id: str
    type_name: str
    payload: dict[str, Any]
    published_at: datetime
    source: InstanceRef | None
    source_message_id: str | None

    @classmethod
    def from_json(cls, app: str, text: str, *, what: str) -> Envelope:
        """Decode a delivery's payload.

        Raises:
            PayloadValidationError: The text is not an envelope (a delivery written by something else).
        """
        try:
            raw = json.loads(text)
            source = raw["source"]
            return cls(
                event_id=str(raw["event_id"]),
                type_name=str(raw["type"]),
                payload=dict(raw["payload"]),
                published_at=datetime.fromisoformat(raw["published_at"]),
                source=None if source is None else InstanceRef(app, source["workflow"], source["workflow_id"]),
                source_message_id=raw["source_message_id"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PayloadValidationError(
                what, "keel event envelope", [{"loc": (), "msg": f"not an event envelope: {exc!r}"}]
            ) from exc

    def decode(self, model: type[Event], *, what: str) -> Event:
        """Validate the payload as ``model``.

        Raises:
            PayloadValidationError: The payload no longer fits ``model`` (it changed between deployments).
        """
        try:
            return model.model_validate(self.payload)
        except ValidationError as exc:
            raise PayloadValidationError(what, model.__name__, exc.errors(include_url=False)) from exc


def build_event(
    app: str,
    event: Event,
    handlers: Sequence[str],
    *,
    event_id: str,
    max_bytes: int,
    source: InstanceRef | None = None,
    source_message_id: str | None = None,
    idempotency_key: str | None = None,
) -> NewEvent:
    """Encode ``event`` with one delivery per handler in ``handlers``.

    Raises:
        TypeError: ``event`` is not a ``keel.Event``.
        NotSerializableError, PayloadTooLargeError: The event is not JSON, or too large.
    """
    if not isinstance(event, Event):
        raise TypeError(f"events must be instances of a keel.Event subclass, not {type(event).__name__}")
    type_name = event_type_name(type(event))
    payload_json = encode(event, what=f"event {type_name}", max_bytes=max_bytes)
    envelope = _envelope_json(event_id, type_name, payload_json, source, source_message_id)
    deliveries = tuple(
        NewMessage(
            InstanceRef(app, delivery_workflow(h), event_id),
            delivery_message_id(event_id, h),
            envelope,
            kind=InstanceKind.delivery,
        )
        for h in handlers
    )
    return NewEvent(
        app, event_id, type_name, payload_json, tuple(handlers), deliveries, source, source_message_id, idempotency_key
    )


def _envelope_json(
    event_id: str, type_name: str, payload_json: str, source: InstanceRef | None, source_message_id: str | None
) -> str:
    """Encode a delivery's payload: the event's identity and source, and its payload's JSON text as it is.

    The payload was just encoded (and size-checked) once; it goes in unparsed, last, so every delivery of a
    large event does not decode and encode it again.
    """
    head = json.dumps(
        {
            "event_id": event_id,
            "type": type_name,
            "published_at": datetime.now(UTC).isoformat(),
            "source": None if source is None else {"workflow": source.workflow, "workflow_id": source.workflow_id},
            "source_message_id": source_message_id,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return f'{head[:-1]},"payload":{payload_json}}}'


@dataclass(frozen=True)
class Delivery:
    """Where one event stands with one of its handlers."""

    handler: str
    status: MessageStatus | None
    #: Why the delivery failed, when it is dead-lettered (or was, and was skipped).
    error: str | None = None


@dataclass(frozen=True)
class EventInfo:
    """An event from the app's log, with the status of its delivery to each handler."""

    event_id: str
    type: str
    payload: dict[str, Any]
    published_at: datetime
    #: What emitted it (a workflow instance's turn, or a handler's delivery); None when a client published it.
    source: Target | None
    source_message_id: str | None
    idempotency_key: str | None
    #: One per handler the event was sent to; ``status`` None once the delivery was pruned (it finished long ago).
    deliveries: tuple[Delivery, ...]

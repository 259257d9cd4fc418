"""What a turn or a handler sends and publishes, held back until it commits (the outbox).

``ctx.send``, ``ctx.emit`` and ``ctx.publish`` validate and encode at the call, so a bad message fails the turn
where it was written, but nothing reaches the backend until the commit, which appends all of it atomically with
the state (or the delivery's acknowledgement). A run that fails or loses its lease leaves no trace. Each call's
ids derive from the running message and the call's position, so a rerun proposes the same ids and the backend
appends nothing twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from keel.backends.base import InstanceRef, NewEvent, NewMessage
from keel.errors import ConfigurationError
from keel.events import Event, build_event, derived_id
from keel.payload import coerce, encode, validate_key

if TYPE_CHECKING:
    from pydantic import BaseModel

    from keel.app import App

logger = logging.getLogger("keel.events")

#: The longest timer a message may carry.
MAX_DELAY_S = 10 * 365 * 24 * 3600.0


def build_message(
    app: App,
    workflow: str,
    workflow_id: str,
    message: BaseModel | dict[str, Any],
    *,
    message_id: str,
    idempotency_key: str | None,
    delay_s: float,
    max_bytes: int,
) -> NewMessage:
    """Validate and encode a message to instance ``workflow_id`` of ``workflow``.

    Raises:
        UnknownWorkflowError: No such workflow; the error lists the registered ones.
        PayloadValidationError: The message does not fit the model; the error names the field.
        InvalidKeyError, PayloadTooLargeError: Bad id, key or size.
        ConfigurationError: ``delay_s`` is negative, not finite, or over ten years.
    """
    spec = app.spec(workflow)
    ref = InstanceRef(app.name, workflow, validate_key(workflow_id, what="workflow_id"))
    if idempotency_key is not None:
        validate_key(idempotency_key, what="idempotency key")
    check_delay(delay_s)
    what = f"message to {workflow}/{workflow_id}"
    payload = encode(coerce(message, spec.message, what=what), what=what, max_bytes=max_bytes)
    return NewMessage(ref, message_id, payload, idempotency_key, float(delay_s))


def build_published_event(
    app: App,
    event: Event,
    *,
    event_id: str,
    max_bytes: int,
    idempotency_key: str | None = None,
    source: InstanceRef | None = None,
    source_message_id: str | None = None,
) -> NewEvent:
    """Encode ``event`` with a delivery to each of the app's handlers of its type.

    Raises:
        TypeError: ``event`` is not a ``keel.Event``.
        InvalidKeyError, NotSerializableError, PayloadTooLargeError: Bad key, not JSON, or too large.
    """
    if not isinstance(event, Event):
        raise TypeError(f"events must be instances of a keel.Event subclass, not {type(event).__name__}")
    if idempotency_key is not None:
        validate_key(idempotency_key, what="idempotency key")
    handlers = [spec.name for spec in app.handlers_of(type(event))]
    if not handlers:
        # G6: an event nobody handles is reported, not silently dropped; it stays in the log (`keel events`).
        logger.warning(
            "event %s (%s) has no handler in app %r: it is recorded in the event log, but no handler will run; "
            "register one with @app.on(%s) in the module every process imports",
            event_id,
            type(event).__name__,
            app.name,
            type(event).__name__,
            extra={"event_id": event_id, "event_type": type(event).__name__},
        )
    return build_event(
        app.name,
        event,
        handlers,
        event_id=event_id,
        max_bytes=max_bytes,
        source=source,
        source_message_id=source_message_id,
        idempotency_key=idempotency_key,
    )


def check_delay(delay_s: object) -> None:
    """Raise unless ``delay_s`` is a usable timer.

    Raises:
        ConfigurationError: ``delay_s`` is negative, not a number, or over ten years.
    """
    if not isinstance(delay_s, int | float) or isinstance(delay_s, bool) or not 0 <= delay_s <= MAX_DELAY_S:
        raise ConfigurationError(
            f"delay_s must be a number of seconds from 0 to {MAX_DELAY_S:g} (ten years), not {delay_s!r}"
        )


class Outbox:
    """The sends and events of one run of one message, committed with it.

    Args:
        app: The app, for models and handlers.
        running: The instance whose message runs (a workflow instance, or a handler's delivery).
        message_id: The running message: every id proposed here derives from it.
        max_bytes: The size limit of one message or event.
    """

    def __init__(self, app: App, running: InstanceRef, message_id: str, *, max_bytes: int) -> None:
        self._app = app
        self._running = running
        self._message_id = message_id
        self._max_bytes = max_bytes
        self.sends: list[NewMessage] = []
        self.events: list[NewEvent] = []

    def send(
        self,
        workflow: str,
        workflow_id: str,
        message: BaseModel | dict[str, Any],
        *,
        idempotency_key: str | None = None,
        delay_s: float = 0.0,
    ) -> str:
        """Queue a message for the commit; return its id (the same on every rerun of this call)."""
        message_id = derived_id("send", self._message_id, str(len(self.sends)))
        self.sends.append(
            build_message(
                self._app,
                workflow,
                workflow_id,
                message,
                message_id=message_id,
                idempotency_key=idempotency_key,
                delay_s=delay_s,
                max_bytes=self._max_bytes,
            )
        )
        return message_id

    def publish(self, event: Event, *, idempotency_key: str | None = None) -> str:
        """Queue an event for the commit; return its id (the same on every rerun of this call)."""
        event_id = derived_id("event", self._message_id, str(len(self.events)))
        self.events.append(
            build_published_event(
                self._app,
                event,
                event_id=event_id,
                max_bytes=self._max_bytes,
                idempotency_key=idempotency_key,
                source=self._running,
                source_message_id=self._message_id,
            )
        )
        return event_id

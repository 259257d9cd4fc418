"""What user code sees while it runs: a turn's private state, a handler's event, and who and where it runs.

Both contexts hold an outbox: what they send and publish is committed with the turn's state (or the handler's
acknowledgement), all or nothing, and proposes the same ids when the run is repeated, so it happens once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from pydantic import BaseModel

from keel.errors import StepError
from keel.records import parse_target

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping
    from datetime import datetime

    from keel.backends.base import InstanceRef
    from keel.events import Event
    from keel.outbox import Outbox
    from keel.records import Target
    from keel.steps import StepRunner

StateT = TypeVar("StateT", bound=BaseModel)
P = ParamSpec("P")
T = TypeVar("T")


class _Effects:
    """What turns and handlers share: durable steps, and sends committed with the run."""

    _steps: StepRunner | None = None
    _outbox: Outbox | None = None

    def send(
        self,
        workflow: str,
        workflow_id: str,
        message: BaseModel | dict[str, Any],
        *,
        idempotency_key: str | None = None,
        delay_s: float = 0.0,
    ) -> str:
        """Send a message to a workflow instance when this turn (or handler) commits, and only then.

        Arguments as ``keel.Client.send``, but an idempotency key is first-wins here: if the key was used for the
        instance with another message, the commit sends nothing for this call and goes on (it never fails over a
        key: ``keel.backends.base.TurnCommit`` says why). Returns the message's id, the same on every rerun of
        this call.

        Raises:
            UnknownWorkflowError, PayloadValidationError, InvalidKeyError, PayloadTooLargeError,
                ConfigurationError: As ``Client.send``; nothing is queued.
        """
        return _require_outbox(self._outbox, "send").send(
            workflow, workflow_id, message, idempotency_key=idempotency_key, delay_s=delay_s
        )

    @overload
    async def step(self, name: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
    @overload
    async def step(self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def step(self, name: str, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run a side effect once per message: ``fn(*args, **kwargs)``, recorded before the run goes on.

        When the turn (or handler delivery) runs again (after a crash, a lost lease or a retry) the recorded
        result is returned and ``fn`` is not called. Either way the result has been through JSON and comes back
        typed by ``fn``'s return annotation. A sync ``fn`` runs in a thread, so it cannot stall the lease's heartbeat.

        Args:
            name: Unique within the run (1-255 printable characters); it names the record.
            fn: The side effect, sync or async.
            *args: Positional arguments for ``fn``.
            **kwargs: Keyword arguments for ``fn``.

        Returns:
            ``fn``'s result, or the one recorded for this message.

        Raises:
            StepError: ``name`` was already used in this run.
            StepTimeoutError: ``fn`` ran past the step timeout (a failed attempt).
            NotSerializableError, PayloadTooLargeError: The result is not JSON, or too large.
            LeaseLostError: The lease was lost: nothing is recorded, and the run cannot commit.
        """
        if self._steps is None:
            raise StepError(f"this {type(self).__name__} runs no steps: steps run inside a worker (or keel.testing)")
        return await self._steps.run(name, fn, args, kwargs)


class TurnContext(_Effects, Generic[StateT]):
    """One turn of one workflow instance.

    Attributes:
        state: A private copy of the instance's state; change it, and it is committed when the function returns
            (the state model's defaults, at version 0, on the instance's first turn).
        workflow: The workflow's name.
        workflow_id: The instance's id.
        message_id: The id of the message this turn runs.
        fencing_token: Grows with every lease on this instance; hand it to outside systems so they can refuse
            the writes of a worker that lost its lease (a paused "zombie").
        attempt: 1 on the message's first run, more when an earlier run died or lost its lease.
        state_version: The version of the state this turn started from.
        worker: The worker running the turn, as ``host:pid``.
        logger: A logger whose records carry the turn's workflow, id, worker, state version, token and attempt.
    """

    def __init__(
        self,
        *,
        state: StateT,
        workflow: str,
        workflow_id: str,
        message_id: str,
        fencing_token: int,
        attempt: int,
        state_version: int,
        worker: str,
    ) -> None:
        self.state = state
        self.workflow = workflow
        self.workflow_id = workflow_id
        self.message_id = message_id
        self.fencing_token = fencing_token
        self.attempt = attempt
        self.state_version = state_version
        self.worker = worker
        self.logger = TurnLogger(logging.getLogger("keel.turn"), self.log_fields())

    def emit(self, event: Event, *, idempotency_key: str | None = None) -> str:
        """Publish ``event`` when this turn commits, and only then: a turn that fails emitted nothing.

        Every handler registered for the event's type receives it (``@app.on``), on whichever worker is free.

        Args:
            event: An instance of a ``keel.Event`` subclass.
            idempotency_key: Publishing again with the same key, anywhere in the app, publishes nothing new:
                first-wins, even for an event of another type or payload (the commit goes on, where
                ``Client.publish`` would raise ``IdempotencyConflictError``).

        Returns:
            The event's id; a rerun of this turn proposes the same id, and the event is appended once.

        Raises:
            TypeError: ``event`` is not a ``keel.Event``.
            NotSerializableError, PayloadTooLargeError, InvalidKeyError: The event cannot be stored as it is.
        """
        return _require_outbox(self._outbox, "emit").publish(event, idempotency_key=idempotency_key)

    def log_fields(self) -> dict[str, Any]:
        """The fields every log record about this turn carries (G9)."""
        return {
            "workflow": self.workflow,
            "workflow_id": self.workflow_id,
            "worker": self.worker,
            "state_version": self.state_version,
            "fencing_token": self.fencing_token,
            "attempt": self.attempt,
            "message_id": self.message_id,
        }

    def __repr__(self) -> str:
        return f"<TurnContext {self.workflow}/{self.workflow_id} v{self.state_version} token={self.fencing_token}>"


class HandlerContext(_Effects):
    """One delivery of one event to one handler.

    Attributes:
        handler: The handler's name.
        event_id: The event's id: the same on every redelivery.
        event_type: The event's type name.
        idempotency_key: ``HANDLER:EVENT_ID``, the same on every redelivery of this event to this handler: pass
            it to outside APIs that deduplicate (payments, mail) so a rerun does not repeat the effect.
        published_at: When the event was published (the publishing process's clock).
        source: What emitted the event: a ``keel.WorkflowInstance`` (a turn) or a ``keel.HandlerDelivery`` (a
            handler's publish); None when a client published it.
        source_workflow: The stored workflow name of ``source`` (``on/NAME`` for a handler), or None.
        source_workflow_id: The stored id of ``source`` (the event's id for a handler), or None.
        attempt: 1 on the first delivery, more on redeliveries (after a failure, a crash or a lost lease).
        fencing_token: Grows with every lease on this delivery; outside systems can refuse a zombie's writes.
        worker: The worker running the handler, as ``host:pid``.
        logger: A logger whose records carry the handler, event, worker, token and attempt.
    """

    def __init__(
        self,
        *,
        handler: str,
        event_id: str,
        event_type: str,
        idempotency_key: str,
        published_at: datetime,
        source: InstanceRef | None,
        message_id: str,
        attempt: int,
        fencing_token: int,
        worker: str,
    ) -> None:
        self.handler = handler
        self.event_id = event_id
        self.event_type = event_type
        self.idempotency_key = idempotency_key
        self.published_at = published_at
        self.source: Target | None = None if source is None else parse_target(source.workflow, source.workflow_id)
        self.source_workflow = None if source is None else source.workflow
        self.source_workflow_id = None if source is None else source.workflow_id
        self.message_id = message_id
        self.attempt = attempt
        self.fencing_token = fencing_token
        self.worker = worker
        self.logger = TurnLogger(logging.getLogger("keel.handler"), self.log_fields())

    def publish(self, event: Event, *, idempotency_key: str | None = None) -> str:
        """Publish ``event`` when this handler succeeds, and only then; a failed run published nothing.

        Returns:
            The event's id; a redelivery proposes the same id, and the event is appended once.

        Raises:
            TypeError: ``event`` is not a ``keel.Event``.
            NotSerializableError, PayloadTooLargeError, InvalidKeyError: The event cannot be stored as it is.
        """
        return _require_outbox(self._outbox, "publish").publish(event, idempotency_key=idempotency_key)

    def log_fields(self) -> dict[str, Any]:
        """The fields every log record about this delivery carries (G9)."""
        return {
            "handler": self.handler,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "worker": self.worker,
            "fencing_token": self.fencing_token,
            "attempt": self.attempt,
            "message_id": self.message_id,
        }

    def __repr__(self) -> str:
        return f"<HandlerContext {self.handler} event={self.event_id} attempt={self.attempt}>"


def _require_outbox(outbox: Outbox | None, verb: str) -> Outbox:
    if outbox is None:
        raise StepError(f"this context cannot {verb}: it is not running inside a worker (or keel.testing)")
    return outbox


class TurnLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds a turn's fields to every record, merged with any ``extra=`` the caller gives."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Merge the turn's fields into the record's ``extra``."""
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs

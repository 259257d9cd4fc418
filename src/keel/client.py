"""The client: send messages and publish events, read states and event deliveries, wait for turns, from any process."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from keel.backends import open_backend
from keel.backends.base import InstanceRef, StoreOptions
from keel.errors import (
    ConfigurationError,
    IdempotencyConflictError,
    MessageNotFoundError,
    NotPausedError,
    TurnFailedError,
    WaitTimeoutError,
)
from keel.events import Delivery, EventInfo, delivery_message_id
from keel.outbox import build_message, build_published_event
from keel.outgoing import build_batch, conflicting_index, in_item
from keel.payload import DEFAULT_MAX_VALUE_BYTES, decode, validate_key
from keel.records import (
    DeadLetter,
    HandlerDelivery,
    MessageStatus,
    TurnOutcome,
    TurnRecord,
    WorkflowInstance,
    parse_target,
)
from keel.types import Versioned

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pydantic import BaseModel

    from keel.app import App
    from keel.backends.base import Backend, ClientBackend, EventRow, MessageInfo, Reader, TurnRecordRow
    from keel.backends.base import DeadLetter as DeadLetterRow
    from keel.events import Event
    from keel.outgoing import Outgoing
    from keel.records import Target

logger = logging.getLogger(__name__)


class Client:
    """Sends messages to an app's workflow instances and reads their state.

    Use it as ``async with app.client() as client``; starting it freezes the app's registry.
    """

    def __init__(self, app: App, url: str, *, max_message_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> None:
        self.app = app
        self.url = url
        self._max_message_bytes = max_message_bytes
        self._backend: Backend | None = None

    async def __aenter__(self) -> Client:
        self.app.freeze()
        self._backend = await open_backend(self.url, StoreOptions())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the backend's connections. Safe to call twice."""
        if self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.aclose()

    async def send(
        self,
        workflow: str,
        workflow_id: str,
        message: BaseModel | dict[str, Any],
        *,
        idempotency_key: str | None = None,
        delay_s: float = 0.0,
    ) -> str:
        """Append ``message`` to the inbox of instance ``workflow_id`` of ``workflow``.

        Args:
            workflow: A registered workflow's name.
            workflow_id: The instance (1-255 printable characters); it exists from its first message on.
            message: An instance of the workflow's message model, or data that validates as one.
            idempotency_key: Sending the same message again with the same key (for the same instance) returns
                the first send's message id and enqueues nothing, for as long as the app's retention keeps keys
                (7 days); another message under the key raises ``IdempotencyConflictError``.
            delay_s: A durable timer: the message becomes visible this many seconds from now (by the backend's
                clock), surviving restarts; messages sent after it but visible sooner run before it.

        Returns:
            The message id, for ``wait()``.

        Raises:
            ConfigurationError: ``delay_s`` is negative, not finite, or over ten years.
            UnknownWorkflowError: No such workflow; the error lists the registered ones.
            PayloadValidationError: The message does not fit the model; the error names the field.
            InvalidKeyError, PayloadTooLargeError: Bad id, key or size. Nothing is enqueued on any error.
            IdempotencyConflictError: ``idempotency_key`` was used for this instance with another message (its JSON
                differs); the error names the key, the instance and the first message's id.
            BackendOverloaded: Every connection stayed busy for the URL's pool timeout; nothing is enqueued.
            BackendUnavailable: The backend cannot be reached.
        """
        new = build_message(
            self.app,
            workflow,
            workflow_id,
            message,
            message_id=uuid.uuid4().hex,
            idempotency_key=idempotency_key,
            delay_s=delay_s,
            max_bytes=self._max_message_bytes,
        )
        message_id = await self._open().send(new)
        logger.debug(
            "message %s sent to %s/%s",
            message_id,
            workflow,
            workflow_id,
            extra={"workflow": workflow, "workflow_id": workflow_id, "message_id": message_id},
        )
        return message_id

    async def send_many(self, messages: Iterable[Outgoing | tuple[Any, ...]]) -> list[str]:
        """Send a batch of messages in one transaction: all of them, or none; one round trip to the backend.

        Each item is what ``send`` takes, as a ``keel.Outgoing(workflow, workflow_id, message, idempotency_key=None,
        delay_s=0.0)`` or a tuple of those fields, and is checked as ``send`` checks it, before anything is sent.
        Messages to one instance join its inbox in the batch's order. An idempotency key repeated in the batch for
        one instance with the same message sends it once (both get the first id). One transaction holds the whole
        batch: keep batches to thousands of messages, not millions.

        Returns:
            For each item in order, its message id (for ``wait()``), or the first message's id under its key.

        Raises:
            TypeError: An item is neither a ``keel.Outgoing`` nor a tuple of its fields.
            ConfigurationError, UnknownWorkflowError, PayloadValidationError, InvalidKeyError, PayloadTooLargeError:
                As ``send``, for the first bad item; the message starts ``item N of the batch``. Nothing is sent.
            IdempotencyConflictError: An item's key was used for its instance with another message, before or
                earlier in the batch; the message starts ``item N of the batch``. Nothing is sent.
            BackendOverloaded: Every connection stayed busy for the URL's pool timeout; nothing is sent.
            BackendUnavailable: The backend cannot be reached; the batch may have been sent, whole.
        """
        new = build_batch(self.app, messages, max_bytes=self._max_message_bytes)
        if not new:
            return []
        try:
            message_ids = await self._open().send_many(new)
        except IdempotencyConflictError as exc:
            index = conflicting_index(new, exc)
            if index is not None:
                in_item(exc, index)
            raise
        logger.debug("%d messages sent in one batch", len(message_ids))
        return message_ids

    async def publish(self, event: Event, *, idempotency_key: str | None = None) -> str:
        """Publish ``event`` to every handler registered for its type (``@app.on``), durably, at once.

        Handlers run on whichever worker is free, at least once each, with a stable ``ctx.idempotency_key``.
        The handlers are the ones this process's app registers: publish from a process that imports the same
        app module as the workers.

        Args:
            event: An instance of a ``keel.Event`` subclass.
            idempotency_key: Publishing the same event again with the same key (anywhere in the app) returns the
                first event's id and publishes nothing, for as long as the app's retention keeps keys (7 days); an
                event of another type or payload under the key raises ``IdempotencyConflictError``.

        Returns:
            The event's id, for ``wait_event()`` and ``keel events``.

        Raises:
            TypeError: ``event`` is not a ``keel.Event``.
            InvalidKeyError, NotSerializableError, PayloadTooLargeError: Bad key, not JSON, or too large; nothing
                is published.
            IdempotencyConflictError: ``idempotency_key`` was used in the app by an event of another type or
                payload; the error names the key, the app and the first event's id. Nothing is published.
            BackendUnavailable: The backend cannot be reached.
        """
        new = build_published_event(
            self.app,
            event,
            event_id=uuid.uuid4().hex,
            max_bytes=self._max_message_bytes,
            idempotency_key=idempotency_key,
        )
        event_id = await self._open().publish(new)
        logger.debug(
            "event %s (%s) published to %s",
            event_id,
            new.type,
            ", ".join(new.handlers) or "no handler",
            extra={"event_id": event_id, "event_type": new.type},
        )
        return event_id

    async def events(self, *, limit: int = 20) -> list[EventInfo]:
        """Return the app's last ``limit`` events, newest first, each with where each handler's delivery stands.

        Raises:
            ConfigurationError: ``limit`` is not a positive integer.
            BackendUnavailable: The backend cannot be reached.
        """
        _check_limit(limit)
        backend = self._open()
        return [await self._event_info(backend, row) for row in await backend.events(self.app.name, limit=limit)]

    async def wait_event(self, event_id: str, *, timeout_s: float) -> None:
        """Wait until every delivery of event ``event_id`` has succeeded.

        Like ``wait()``, it wakes on the backend's own announcement of each delivery's end, not by polling.

        Raises:
            MessageNotFoundError: No delivery of this event to a handler this app registers exists (unknown
                event, one without handlers, or one whose deliveries were pruned).
            TurnFailedError: A delivery was dead-lettered (its traceback in the error), or skipped after that; raised
                as soon as that delivery ends, whatever the others are doing.
            WaitTimeoutError: Not all done within ``timeout_s``; the deliveries stay queued.
            BackendUnavailable: The backend cannot be reached.
        """
        backend = self._open()
        app, ids = self.app.name, {name: delivery_message_id(event_id, name) for name in self.app.handlers}
        waits = {
            asyncio.ensure_future(backend.wait_for_end(app, message_id, timeout_s=timeout_s)): name
            for name, message_id in ids.items()
        }
        ended: list[MessageInfo] = []
        try:
            waiting = set(waits)
            while waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for wait in done:
                    if (info := wait.result()) is not None:
                        # At once, whatever the other deliveries are doing: the event can no longer succeed.
                        _raise_if_dead(info, f"handler {waits[wait]} on event {event_id}")
                        ended.append(info)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if not ended:
            raise MessageNotFoundError(self.app.name, event_id)
        if any(info.status is not MessageStatus.done for info in ended):
            raise WaitTimeoutError(f"event {event_id}", event_id, timeout_s, url=backend.url)

    async def _event_info(self, backend: Reader, row: EventRow) -> EventInfo:
        deliveries = []
        for handler in row.handlers:
            info = await backend.message(self.app.name, delivery_message_id(row.event_id, handler))
            deliveries.append(
                Delivery(handler, None if info is None else info.status, None if info is None else info.error)
            )
        return EventInfo(
            row.event_id,
            row.type,
            decode(row.payload_json),
            row.published_at,
            None if row.source is None else parse_target(row.source.workflow, row.source.workflow_id),
            row.source_message_id,
            row.idempotency_key,
            tuple(deliveries),
        )

    async def state(self, workflow: str, workflow_id: str) -> Versioned[Any] | None:
        """Return the instance's committed state, typed by the workflow's state model, or None before its first turn.

        Raises:
            UnknownWorkflowError: No such workflow.
            PayloadValidationError: The stored state no longer fits the state model (the model changed).
            BackendUnavailable: The backend cannot be reached.
        """
        spec = self.app.spec(workflow)
        ref = InstanceRef(self.app.name, workflow, validate_key(workflow_id, what="workflow_id"))
        record = await self._open().state(ref)
        if record is None or record.value_json is None:
            return None
        value = decode(record.value_json, spec.state, what=f"state of {workflow}/{workflow_id}")
        return Versioned[Any].model_construct(
            value=value, version=record.version, written_at=record.written_at, writer=record.writer, deleted=False
        )

    async def wait(self, workflow: str, workflow_id: str, message_id: str, *, timeout_s: float) -> int:
        """Wait until the turn that runs ``message_id`` has committed.

        It does not poll: the backend announces each message's end (commit, dead letter, skip) as part of the write
        that makes it, from whichever process, and the wait wakes on that (``Reader.wait_for_end``). Any number of
        concurrent waits on one client share one listener and hold no pooled connection while they wait.

        Returns:
            The state version that turn committed.

        Raises:
            MessageNotFoundError: No such message was sent to this instance (the error says so when it was sent
                to another one).
            TurnFailedError: The turn failed for good (its traceback in the error), or was skipped after that.
            WaitTimeoutError: Not committed within ``timeout_s``; the message stays queued. The error names the
                backend's URL (a SQLite file as an absolute path), so a client on another file than the worker's shows.
            BackendUnavailable: The backend cannot be reached.
        """
        self.app.spec(workflow)
        ref = InstanceRef(self.app.name, workflow, workflow_id)
        where = f"{workflow}/{workflow_id}"
        backend = self._open()
        # One read first: a message of another instance is refused at once, and one already ended returns.
        info = await backend.message(self.app.name, message_id)
        if info is not None and info.instance == ref and info.status is MessageStatus.pending:
            info = await backend.wait_for_end(self.app.name, message_id, timeout_s=timeout_s)
        if info is None:
            raise MessageNotFoundError(self.app.name, message_id)
        if info.instance != ref:
            sent_to = str(parse_target(info.instance.workflow, info.instance.workflow_id))
            raise MessageNotFoundError(self.app.name, message_id, expected=where, sent_to=sent_to)
        _raise_if_dead(info, where)
        if info.status is not MessageStatus.done:
            raise WaitTimeoutError(where, message_id, timeout_s, url=backend.url)
        assert info.state_version is not None  # a done message records the version its turn committed
        return info.state_version

    async def turns(
        self, workflow: str | Target, workflow_id: str | None = None, *, limit: int = 100
    ) -> list[TurnRecord]:
        """Return the last ``limit`` turn records of an instance (or of a handler's delivery), oldest first.

        Each says who ran the attempt, under which fencing token, from which state version to which, how long
        it took and how it ended (``keel.TurnOutcome``), with the error of a failed one.

        Args:
            workflow: A workflow's name, with ``workflow_id``; or, alone, what to read: a ``keel.WorkflowInstance``,
                or a ``keel.HandlerDelivery(handler, event_id)`` for a handler's delivery of an event.
            workflow_id: The instance's id, with a workflow name.
            limit: How many records, at most.

        Raises:
            UnknownWorkflowError: No such workflow or handler.
            ConfigurationError: ``limit`` is not a positive integer, or the target is given wrongly.
            BackendUnavailable: The backend cannot be reached.
        """
        target = self._target(workflow, workflow_id)
        _check_limit(limit)
        rows = await self._open().turns(self._ref(target), limit=limit)
        return [_turn_record(target, row) for row in reversed(rows)]

    async def delete(self, workflow: str, workflow_id: str) -> bool:
        """Delete an instance and everything it owns: state, history, messages (queued ones too), records.

        A worker running one of its turns at that moment cannot commit it. A later message starts the
        instance afresh from the state model's defaults.

        Returns:
            True if the instance existed.

        Raises:
            UnknownWorkflowError: No such workflow.
            BackendUnavailable: The backend cannot be reached.
        """
        self.app.spec(workflow)
        ref = InstanceRef(self.app.name, workflow, validate_key(workflow_id, what="workflow_id"))
        existed = await self._open().delete_instance(ref)
        logger.info(
            "instance %s/%s %s",
            workflow,
            workflow_id,
            "deleted" if existed else "not found: nothing deleted",
            extra={"workflow": workflow, "workflow_id": workflow_id},
        )
        return existed

    async def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """Return the app's dead-lettered messages, newest first, each with its error, attempts and time.

        ``letter.instance`` says what failed, and is what ``retry()`` and ``skip()`` take: a
        ``keel.WorkflowInstance``, or a ``keel.HandlerDelivery`` for a handler's delivery of an event.

        Raises:
            ConfigurationError: ``limit`` is not a positive integer.
            BackendUnavailable: The backend cannot be reached.
        """
        _check_limit(limit)
        return [_dead_letter(row) for row in await self._open().dead_letters(self.app.name, limit=limit)]

    async def retry(self, workflow: str | Target, workflow_id: str | None = None) -> str:
        """Run the dead message of a paused instance again (attempts start afresh) and un-pause the instance.

        Args:
            workflow: A workflow's name, with ``workflow_id``; or, alone, what to retry: a dead letter's
                ``instance``, e.g. ``keel.HandlerDelivery("notify", event_id)`` for a handler's delivery.
            workflow_id: The instance's id, with a workflow name.

        Returns:
            The message id, for ``wait()``.

        Raises:
            UnknownWorkflowError: No such workflow or handler.
            NotPausedError: No dead letter pauses the instance (or the delivery).
            ConfigurationError: The target is given wrongly.
            BackendUnavailable: The backend cannot be reached.
        """
        return await self._resolve(self._target(workflow, workflow_id), skip=False)

    async def skip(self, workflow: str | Target, workflow_id: str | None = None) -> str:
        """Drop the dead message of a paused instance (recorded as skipped) and let the instance go on.

        Args:
            workflow: A workflow's name, with ``workflow_id``; or, alone, what to skip: a dead letter's
                ``instance``, e.g. ``keel.HandlerDelivery("notify", event_id)`` for a handler's delivery.
            workflow_id: The instance's id, with a workflow name.

        Returns:
            The skipped message's id.

        Raises:
            UnknownWorkflowError: No such workflow or handler.
            NotPausedError: No dead letter pauses the instance (or the delivery).
            ConfigurationError: The target is given wrongly.
            BackendUnavailable: The backend cannot be reached.
        """
        return await self._resolve(self._target(workflow, workflow_id), skip=True)

    async def _resolve(self, target: Target, *, skip: bool) -> str:
        message_id = await self._open().resolve_dead_letter(self._ref(target), skip=skip)
        if message_id is None:
            raise NotPausedError(str(target))
        logger.info(
            "dead letter %s of %s %s",
            message_id,
            target,
            "skipped" if skip else "sent to run again",
            extra={"workflow": target.workflow, "workflow_id": target.workflow_id, "message_id": message_id},
        )
        return message_id

    def _target(self, workflow: str | Target, workflow_id: str | None) -> Target:
        """Resolve a (workflow, workflow_id) pair or a typed target into a registered, checked target."""
        if isinstance(workflow, WorkflowInstance | HandlerDelivery):
            if workflow_id is not None:
                raise ConfigurationError(f"pass {workflow!r} alone, without a workflow_id (got {workflow_id!r})")
            self.app.job(workflow)
            validate_key(
                workflow.workflow_id, what="event_id" if isinstance(workflow, HandlerDelivery) else "workflow_id"
            )
            return workflow
        if not isinstance(workflow, str) or workflow_id is None:
            raise ConfigurationError(
                "name the instance as (workflow, workflow_id), or pass a keel.WorkflowInstance or "
                f"keel.HandlerDelivery alone; got {workflow!r}, {workflow_id!r}"
            )
        # A stored name: ``on/NAME`` still names handler NAME's deliveries, as dead letters listed them before.
        self.app.job(workflow)
        return parse_target(workflow, validate_key(workflow_id, what="workflow_id"))

    def _ref(self, target: Target) -> InstanceRef:
        return InstanceRef(self.app.name, target.workflow, target.workflow_id)

    def _open(self) -> ClientBackend:
        if self._backend is None:
            raise ConfigurationError("the client is not open: use it inside `async with app.client() as client:`")
        return self._backend


def _raise_if_dead(info: MessageInfo, where: str) -> None:
    """Raise ``TurnFailedError`` if the message was dead-lettered, or skipped after that."""
    if info.status is MessageStatus.failed:
        raise TurnFailedError(where, info.message_id, info.error or "")
    if info.status is MessageStatus.skipped:
        error = (info.error or "").rstrip() + "\nthe dead letter was skipped (keel skip): it will never run"
        raise TurnFailedError(where, info.message_id, error.lstrip())


def _turn_record(target: Target, row: TurnRecordRow) -> TurnRecord:
    stateless = isinstance(target, HandlerDelivery)
    return TurnRecord(
        instance=target,
        message_id=row.message_id,
        worker=row.worker,
        attempt=row.attempt,
        fencing_token=row.fencing_token,
        version_read=None if stateless else row.version_read,
        version_written=None if stateless else row.version_written,
        started_at=row.started_at,
        duration_s=row.duration_s,
        outcome=TurnOutcome(row.outcome),
        error=row.error,
    )


def _dead_letter(row: DeadLetterRow) -> DeadLetter:
    return DeadLetter(
        instance=parse_target(row.instance.workflow, row.instance.workflow_id),
        message_id=row.message_id,
        error=row.error,
        attempts=row.attempts,
        failed_at=row.failed_at,
    )


def _check_limit(limit: object) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigurationError(f"limit must be a positive integer, not {limit!r}")

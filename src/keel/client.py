"""The client: send messages to workflow instances, read their state, wait for their turns, from any process."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from keel.backends import open_backend
from keel.backends.base import InstanceRef, MessageStatus, NewMessage, StoreOptions
from keel.errors import ConfigurationError, MessageNotFoundError, NotPausedError, TurnFailedError, WaitTimeoutError
from keel.payload import DEFAULT_MAX_VALUE_BYTES, coerce, decode, encode, validate_key
from keel.types import Versioned

if TYPE_CHECKING:
    from pydantic import BaseModel

    from keel.app import App
    from keel.backends.base import Backend, DeadLetter, TurnRecordRow

logger = logging.getLogger(__name__)

#: The longest pause between two looks at a message's status in ``wait()``.
WAIT_POLL_MAX_S = 0.1


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
            idempotency_key: Sending again with the same key (for the same instance) returns the first send's
                message id and enqueues nothing, for as long as the app's retention keeps keys (7 days).
            delay_s: A durable timer: the message becomes visible this many seconds from now (by the backend's
                clock), surviving restarts; messages sent after it but visible sooner run before it.

        Returns:
            The message id, for ``wait()``.

        Raises:
            ConfigurationError: ``delay_s`` is negative, not finite, or over ten years.
            UnknownWorkflowError: No such workflow; the error lists the registered ones.
            PayloadValidationError: The message does not fit the model; the error names the field.
            InvalidKeyError, PayloadTooLargeError: Bad id, key or size. Nothing is enqueued on any error.
            BackendUnavailable: The backend cannot be reached.
        """
        spec = self.app.spec(workflow)
        ref = InstanceRef(self.app.name, workflow, validate_key(workflow_id, what="workflow_id"))
        if idempotency_key is not None:
            validate_key(idempotency_key, what="idempotency key")
        _check_delay(delay_s)
        what = f"message to {workflow}/{workflow_id}"
        payload = encode(coerce(message, spec.message, what=what), what=what, max_bytes=self._max_message_bytes)
        new = NewMessage(ref, uuid.uuid4().hex, payload, idempotency_key, float(delay_s))
        message_id = await self._open().send(new)
        logger.debug(
            "message %s sent to %s/%s",
            message_id,
            workflow,
            workflow_id,
            extra={"workflow": workflow, "workflow_id": workflow_id, "message_id": message_id},
        )
        return message_id

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

        Returns:
            The state version that turn committed.

        Raises:
            MessageNotFoundError: No such message was sent to this instance.
            TurnFailedError: The turn failed for good (its traceback in the error), or was skipped after that.
            WaitTimeoutError: Not committed within ``timeout_s``; the message stays queued.
            BackendUnavailable: The backend cannot be reached.
        """
        self.app.spec(workflow)
        ref = InstanceRef(self.app.name, workflow, workflow_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pause_s = 0.005
        while True:
            info = await self._open().message(self.app.name, message_id)
            if info is None or info.instance != ref:
                raise MessageNotFoundError(self.app.name, message_id)
            if info.status is MessageStatus.done and info.state_version is not None:
                return info.state_version
            if info.status is MessageStatus.failed:
                raise TurnFailedError(f"{workflow}/{workflow_id}", message_id, info.error or "")
            if info.status is MessageStatus.skipped:
                error = (info.error or "").rstrip() + "\nthe dead letter was skipped (keel skip): it will never run"
                raise TurnFailedError(f"{workflow}/{workflow_id}", message_id, error.lstrip())
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise WaitTimeoutError(f"{workflow}/{workflow_id}", message_id, timeout_s)
            await asyncio.sleep(min(pause_s, remaining))
            pause_s = min(pause_s * 2, WAIT_POLL_MAX_S)

    async def turns(self, workflow: str, workflow_id: str, *, limit: int = 100) -> list[TurnRecordRow]:
        """Return the instance's last ``limit`` turn records, oldest first.

        Each says who ran the attempt, under which fencing token, from which state version to which, how long
        it took and how it ended (committed, retry, failed), with the error of a failed one.

        Raises:
            UnknownWorkflowError: No such workflow.
            ConfigurationError: ``limit`` is not a positive integer.
            BackendUnavailable: The backend cannot be reached.
        """
        self.app.spec(workflow)
        _check_limit(limit)
        ref = InstanceRef(self.app.name, workflow, validate_key(workflow_id, what="workflow_id"))
        return list(reversed(await self._open().turns(ref, limit=limit)))

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

        Raises:
            ConfigurationError: ``limit`` is not a positive integer.
            BackendUnavailable: The backend cannot be reached.
        """
        _check_limit(limit)
        return await self._open().dead_letters(self.app.name, limit=limit)

    async def retry(self, workflow: str, workflow_id: str) -> str:
        """Run the dead message of a paused instance again (attempts start afresh) and un-pause the instance.

        Returns:
            The message id, for ``wait()``.

        Raises:
            UnknownWorkflowError: No such workflow.
            NotPausedError: No dead letter pauses the instance.
            BackendUnavailable: The backend cannot be reached.
        """
        return await self._resolve(workflow, workflow_id, skip=False)

    async def skip(self, workflow: str, workflow_id: str) -> str:
        """Drop the dead message of a paused instance (recorded as skipped) and let the instance go on.

        Returns:
            The skipped message's id.

        Raises:
            UnknownWorkflowError: No such workflow.
            NotPausedError: No dead letter pauses the instance.
            BackendUnavailable: The backend cannot be reached.
        """
        return await self._resolve(workflow, workflow_id, skip=True)

    async def _resolve(self, workflow: str, workflow_id: str, *, skip: bool) -> str:
        self.app.spec(workflow)
        ref = InstanceRef(self.app.name, workflow, validate_key(workflow_id, what="workflow_id"))
        message_id = await self._open().resolve_dead_letter(ref, skip=skip)
        if message_id is None:
            raise NotPausedError(f"{workflow}/{workflow_id}")
        logger.info(
            "dead letter %s of %s/%s %s",
            message_id,
            workflow,
            workflow_id,
            "skipped" if skip else "sent to run again",
            extra={"workflow": workflow, "workflow_id": workflow_id, "message_id": message_id},
        )
        return message_id

    def _open(self) -> Backend:
        if self._backend is None:
            raise ConfigurationError("the client is not open: use it inside `async with app.client() as client:`")
        return self._backend


#: The longest timer a message may carry.
MAX_DELAY_S = 10 * 365 * 24 * 3600.0


def _check_delay(delay_s: object) -> None:
    if not isinstance(delay_s, int | float) or isinstance(delay_s, bool) or not 0 <= delay_s <= MAX_DELAY_S:
        raise ConfigurationError(
            f"delay_s must be a number of seconds from 0 to {MAX_DELAY_S:g} (ten years), not {delay_s!r}"
        )


def _check_limit(limit: object) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigurationError(f"limit must be a positive integer, not {limit!r}")

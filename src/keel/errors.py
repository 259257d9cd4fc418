"""Every error keel raises, in one tree.

```
KeelError
├── ConfigurationError            a URL, option or environment keel cannot work with
│   ├── UnknownSchemeError        the URL's scheme names no engine
│   ├── MissingExtraError         the engine's driver is not installed
│   └── UnsafeLocationError       a SQLite file on a network filesystem
├── BackendUnavailable            the engine cannot be reached, or went away mid-operation
├── BackendOverloaded             the engine answers, but a call waited past its bound for a connection
├── InvalidKeyError               a key that is empty, too long or not printable
├── PayloadError                  a value keel refuses to store
│   ├── NotSerializableError      not a JSON document
│   ├── PayloadTooLargeError      over the size limit
│   └── PayloadValidationError    does not fit its pydantic model
├── StoreError
│   ├── StaleWriteError           compare-and-swap lost: the version moved on
│   ├── KeyNotFoundError          update() of a missing key without a default
│   ├── UpdateContentionError     update() kept losing until its deadline
│   └── LeaseLostError            a worker's lease on an instance is gone: its commit is refused
├── IdempotencyConflictError      an idempotency key used again with another payload: nothing was sent
├── RegistrationError             a workflow or handler registered wrongly, or after start-up
├── NotFoundError                 a lookup found nothing of that name
│   ├── UnknownWorkflowError      a workflow, handler or event type name the app does not have
│   ├── MessageNotFoundError      wait() for a message that was never sent (to that instance)
│   ├── InstanceNotFoundError     keel state of an instance no turn of which has committed
│   └── NotPausedError            keel retry / skip of an instance no dead letter pauses
├── TurnFailedError               the turn that ran a message raised
├── WaitTimeoutError              wait() ran out of time before the turn committed
├── TurnTimeoutError              a turn ran past its timeout (a failed attempt)
├── StepTimeoutError              a step ran past its timeout (a failed attempt)
├── NonRetryable                  raised by user code: dead-letter at once, do not retry
│   └── StepError                 a step used wrongly: a name twice in one turn
└── RetryAfter                    raised by user code: retry after a given delay (a 429's Retry-After)
```

The class docstring is the default message. Domain data travels in attributes, so callers never parse
messages. A rejected write never changes anything stored. Every class declares its own ``code`` (an
``ErrorCode``): what HTTP responses and the command line's exit statuses are chosen by.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from keel.backends.base import NewEvent, NewMessage, StoredRecord


class ErrorCode(StrEnum):
    """Stable identifiers for errors, for HTTP responses and machine-readable output: one per error class."""

    error = "error"
    configuration = "configuration"
    unknown_scheme = "unknown_scheme"
    missing_extra = "missing_extra"
    unsafe_location = "unsafe_location"
    backend_unavailable = "backend_unavailable"
    backend_overloaded = "backend_overloaded"
    invalid_key = "invalid_key"
    payload = "payload"
    not_serializable = "not_serializable"
    payload_too_large = "payload_too_large"
    payload_validation = "payload_validation"
    store = "store"
    stale_write = "stale_write"
    key_not_found = "key_not_found"
    contention = "contention"
    lease_lost = "lease_lost"
    idempotency_conflict = "idempotency_conflict"
    registration = "registration"
    not_found = "not_found"
    unknown_workflow = "unknown_workflow"
    message_not_found = "message_not_found"
    instance_not_found = "instance_not_found"
    not_paused = "not_paused"
    turn_failed = "turn_failed"
    wait_timeout = "wait_timeout"
    turn_timeout = "turn_timeout"
    step_timeout = "step_timeout"
    non_retryable = "non_retryable"
    step_misuse = "step_misuse"
    retry_after = "retry_after"
    #: ``keel demo`` could not run to the end (``keel.demo.DemoError``).
    demo_failed = "demo_failed"


class KeelError(Exception):
    """Raised by keel."""

    code: ClassVar[ErrorCode] = ErrorCode.error

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self)


class ConfigurationError(KeelError):
    """Raised when a URL, option or environment setting cannot be used."""

    code = ErrorCode.configuration


class UnknownSchemeError(ConfigurationError):
    """Raised when a backend URL's scheme names no engine keel knows."""

    code = ErrorCode.unknown_scheme

    def __init__(self, url: str, scheme: str, supported: list[str]) -> None:
        self.url = url
        self.scheme = scheme
        self.supported = supported
        listed = ", ".join(f"{name}://" for name in supported)
        super().__init__(f"unknown backend scheme {scheme!r} in {url!r}; supported schemes: {listed}")


class MissingExtraError(ConfigurationError):
    """Raised when a backend's driver is not installed."""

    code = ErrorCode.missing_extra

    def __init__(self, engine: str, extra: str, module: str) -> None:
        self.engine = engine
        self.extra = extra
        self.module = module
        super().__init__(
            f"the {engine} backend needs the {module!r} package, which is not installed; "
            f"run `pip install 'keel-runtime[{extra}]'`"
        )


class UnsafeLocationError(ConfigurationError):
    """Raised when a SQLite database would live where its locks cannot be trusted."""

    code = ErrorCode.unsafe_location

    def __init__(self, path: str, fstype: str) -> None:
        self.path = path
        self.fstype = fstype
        super().__init__(
            f"refusing SQLite database {path!r}: it is on a {fstype!r} network filesystem, where SQLite's "
            "file locks are unreliable and concurrent writers corrupt the file; put it on a local disk, "
            "or use postgresql:// or redis:// to share state between machines"
        )


class BackendUnavailable(KeelError):
    """Raised when the backend cannot be reached or stopped answering mid-operation."""

    code = ErrorCode.backend_unavailable

    def __init__(self, url: str, detail: str, *, hint: str = "") -> None:
        self.url = url
        self.detail = detail
        self.hint = hint
        text = f"backend {url} is unavailable: {detail}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class BackendOverloaded(KeelError):
    """Raised when a call waited past its bound for a connection to a backend that answers; nothing was written.

    Load, not an outage: more calls at once than the backend's connections serve within the wait the URL allows.
    The call never reached the backend, so repeating it is safe. ``queued`` is about how many calls were waiting
    for one of ``connections`` when it gave up, itself included (for SQLite: the connection is the file's write
    lock, shared with other processes); ``hint`` names the URL parameters to raise, or what to lower.
    """

    code = ErrorCode.backend_overloaded

    def __init__(self, url: str, *, waited_s: float, queued: int, connections: int, hint: str) -> None:
        self.url = url
        self.waited_s = waited_s
        self.queued = queued
        self.connections = connections
        self.hint = hint
        calls = "1 call was" if queued == 1 else f"{queued} calls were"
        pooled = "1 connection" if connections == 1 else f"{connections} connections"
        super().__init__(
            f"backend {url} is overloaded, not down: a call waited {waited_s:g} s for a connection and got none; "
            f"{calls} queued for {pooled}; nothing was written, so the call can be repeated ({hint})"
        )


class InvalidKeyError(KeelError, ValueError):
    """Raised when a key is empty, longer than 255 characters or not printable."""

    code = ErrorCode.invalid_key

    def __init__(self, key: object, reason: str) -> None:
        self.key = key
        self.reason = reason
        shown = repr(key) if not isinstance(key, str) or len(key) <= 60 else repr(key[:60]) + "..."
        super().__init__(f"invalid key {shown}: {reason}")


class PayloadError(KeelError):
    """Raised when a value cannot be stored."""

    code = ErrorCode.payload


class NotSerializableError(PayloadError, TypeError):
    """Raised when a value is not a JSON document."""

    code = ErrorCode.not_serializable

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        self.detail = detail
        super().__init__(f"{what} is not JSON-serialisable: {detail}; keel stores JSON documents, never pickle")


class PayloadTooLargeError(PayloadError, ValueError):
    """Raised when a value's JSON encoding is over the size limit."""

    code = ErrorCode.payload_too_large

    def __init__(self, what: str, size_bytes: int, limit_bytes: int) -> None:
        self.what = what
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        super().__init__(
            f"{what} is {size_bytes} bytes as JSON, over the limit of {limit_bytes} bytes "
            "(raise it with max_value_bytes=, or store large blobs elsewhere and keep a reference)"
        )


class PayloadValidationError(PayloadError, ValueError):
    """Raised when a value does not fit its pydantic model."""

    code = ErrorCode.payload_validation

    def __init__(self, what: str, model: str, errors: Sequence[Mapping[str, Any]]) -> None:
        self.what = what
        self.model = model
        self.errors: list[dict[str, Any]] = [dict(err) for err in errors]
        parts = []
        for err in self.errors[:5]:
            field = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
            parts.append(f"{field}: {err.get('msg', 'invalid')}")
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{what} does not fit {model}: " + "; ".join(parts) + more)


class StoreError(KeelError):
    """Raised when a store operation cannot be carried out."""

    code = ErrorCode.store


class StaleWriteError(StoreError):
    """Raised when a compare-and-swap finds another version than expected; nothing was written."""

    code = ErrorCode.stale_write

    def __init__(
        self, key: str, expected_version: int | None, actual_version: int | None, *, current: StoredRecord | None = None
    ) -> None:
        self.key = key
        self.expected_version = expected_version
        self.actual_version = actual_version
        #: The live record the engine found, when it returns one: ``update()`` retries from it without a re-read.
        self.current = current
        expected = "absent" if expected_version is None else f"version {expected_version}"
        actual = "absent" if actual_version is None else f"at version {actual_version}"
        super().__init__(f"stale write to {key!r}: expected {expected}, but it is {actual}; nothing was written")


class KeyNotFoundError(StoreError, KeyError):
    """Raised when update() finds no value and was given no default."""

    code = ErrorCode.key_not_found

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no value stored at {key!r}; pass default= to update() to create it")

    def __str__(self) -> str:
        # KeyError's own __str__ would print the repr of the message.
        return str(self.args[0])


class UpdateContentionError(StoreError):
    """Raised when update() lost every compare-and-swap until its deadline; nothing was written."""

    code = ErrorCode.contention

    def __init__(self, key: str, attempts: int, deadline_s: float) -> None:
        self.key = key
        self.attempts = attempts
        self.deadline_s = deadline_s
        super().__init__(
            f"update of {key!r} gave up after {attempts} attempts in {deadline_s:g} s: other writers kept "
            "changing it first; nothing was written (raise update_deadline_s=, or spread the writes over more keys)"
        )


class LeaseLostError(StoreError):
    """Raised when a worker's lease on a workflow instance is gone; nothing it tried to write was written."""

    code = ErrorCode.lease_lost

    def __init__(self, instance: str, fencing_token: int, reason: str) -> None:
        self.instance = instance
        self.fencing_token = fencing_token
        self.reason = reason
        super().__init__(
            f"lease on {instance} under fencing token {fencing_token} is lost: {reason}; nothing was written"
        )


class IdempotencyConflictError(KeelError, ValueError):
    """Raised when an idempotency key is used again with another payload; nothing was sent or published.

    The same key with the same payload is a repeat, and returns the first id without raising. ``instance`` is
    ``WORKFLOW/WORKFLOW_ID`` for a message (message keys are per instance) and None for an event (event keys are
    per app).
    """

    code = ErrorCode.idempotency_conflict

    def __init__(
        self, key: str, first_id: str, *, app: str, workflow: str | None = None, workflow_id: str | None = None
    ) -> None:
        self.key = key
        self.first_id = first_id
        self.app = app
        instance = None if workflow is None else f"{workflow}/{workflow_id}"
        self.instance = instance
        if instance is None:
            used, what, verb = f"in app {app!r} by event {first_id}", "type or payload", "published"
        else:
            used, what, verb = f"for instance {instance} of app {app!r} by message {first_id}", "payload", "sent"
        super().__init__(
            f"idempotency key {key!r} was used before {used}, with another {what}; nothing was {verb} "
            f"(the same {what} again returns {first_id}; something new needs a new key)"
        )

    @classmethod
    def of_message(cls, message: NewMessage, first_id: str) -> IdempotencyConflictError:
        """The error of a send whose key holds message ``first_id`` of its instance, with another payload."""
        ref = message.instance
        key = message.idempotency_key or ""
        return cls(key, first_id, app=ref.app, workflow=ref.workflow, workflow_id=ref.workflow_id)

    @classmethod
    def of_event(cls, event: NewEvent, first_id: str) -> IdempotencyConflictError:
        """The error of a publish whose key holds event ``first_id`` of its app, of another type or payload."""
        return cls(event.idempotency_key or "", first_id, app=event.app)


class RegistrationError(KeelError):
    """Raised when a workflow or handler is registered wrongly, or after the app has started."""

    code = ErrorCode.registration


class NotFoundError(KeelError, LookupError):
    """Raised when a lookup finds nothing: no such workflow, handler, event type, message or instance."""

    code = ErrorCode.not_found


class UnknownWorkflowError(NotFoundError):
    """Raised when a workflow (or handler, or event type) name is not registered in the app."""

    code = ErrorCode.unknown_workflow

    def __init__(self, app: str, workflow: str, registered: list[str], *, kind: str = "workflow") -> None:
        self.app = app
        self.workflow = workflow
        self.registered = registered
        known = ", ".join(registered) if registered else "none"
        super().__init__(f"app {app!r} has no {kind} {workflow!r}; registered {kind}s: {known}")


class MessageNotFoundError(NotFoundError):
    """Raised when a message id was never sent to the app, or was sent to another instance than the one named."""

    code = ErrorCode.message_not_found

    def __init__(self, app: str, message_id: str, *, expected: str | None = None, sent_to: str | None = None) -> None:
        self.app = app
        self.message_id = message_id
        #: The instance the caller named, and the one the message was sent to, when they differ.
        self.expected = expected
        self.sent_to = sent_to
        if expected is not None and sent_to is not None:
            super().__init__(f"message {message_id!r} of app {app!r} was sent to {sent_to}, not to {expected}")
        else:
            super().__init__(f"app {app!r} has no message {message_id!r}")


class InstanceNotFoundError(NotFoundError):
    """Raised when a workflow instance has no committed state yet."""

    code = ErrorCode.instance_not_found

    def __init__(self, workflow: str, workflow_id: str) -> None:
        self.workflow = workflow
        self.workflow_id = workflow_id
        super().__init__(
            f"instance {workflow_id!r} of workflow {workflow!r} has no committed state: no turn of it has "
            "committed yet (was a message sent, and is a worker running on this backend?)"
        )


class TurnFailedError(KeelError):
    """Raised by wait() when the turn that ran the message raised; the error is the turn's traceback."""

    code = ErrorCode.turn_failed

    def __init__(self, instance: str, message_id: str, error: str) -> None:
        self.instance = instance
        self.message_id = message_id
        self.error = error
        last = error.strip().splitlines()[-1] if error.strip() else "unknown error"
        super().__init__(f"the turn of {instance} for message {message_id} failed: {last}")


class WaitTimeoutError(KeelError, TimeoutError):
    """Raised by wait() when the message's turn did not commit in time; the message is still queued."""

    code = ErrorCode.wait_timeout

    def __init__(self, instance: str, message_id: str, timeout_s: float, *, url: str | None = None) -> None:
        self.instance = instance
        self.message_id = message_id
        self.timeout_s = timeout_s
        #: The backend the message was sent to (password masked): a client started in the wrong folder opens
        #: another ``./keel.db`` than the worker's, and this is how it shows.
        self.url = url
        backend = "this backend" if url is None else url
        super().__init__(
            f"message {message_id} to {instance} was not committed within {timeout_s:g} s; it stays queued "
            f"(is a `keel worker` running for this app on {backend}?)"
        )


class NonRetryable(KeelError):
    """Raise it (or a subclass) in a workflow to dead-letter the message at once: retrying cannot help."""

    code = ErrorCode.non_retryable


class StepError(NonRetryable):
    """Raised when a step is used wrongly, such as one name twice in one turn; retrying would do the same."""

    code = ErrorCode.step_misuse


class TurnTimeoutError(KeelError, TimeoutError):
    """Raised when a turn (or a handler) runs past its timeout; it counts as a failed attempt.

    ``instance`` says what ran: ``the turn of WORKFLOW/ID``, or ``handler NAME on event ID``.
    """

    code = ErrorCode.turn_timeout

    def __init__(self, instance: str, timeout_s: float) -> None:
        self.instance = instance
        self.timeout_s = timeout_s
        super().__init__(f"{instance} ran past its timeout of {timeout_s:g} s and was cancelled")


class StepTimeoutError(KeelError, TimeoutError):
    """Raised when a step runs past its timeout; the turn fails and counts as a failed attempt."""

    code = ErrorCode.step_timeout

    def __init__(self, step: str, timeout_s: float) -> None:
        self.step = step
        self.timeout_s = timeout_s
        super().__init__(f"step {step!r} ran past its timeout of {timeout_s:g} s and was cancelled")


class RetryAfter(KeelError):
    """Raise it in a workflow to retry the turn after ``delay_s`` seconds, e.g. a rate limit's Retry-After."""

    code = ErrorCode.retry_after

    def __init__(self, delay_s: float, reason: str = "") -> None:
        if not delay_s >= 0:
            raise ValueError(f"RetryAfter needs a delay of 0 seconds or more, not {delay_s!r}")
        self.delay_s = float(delay_s)
        self.reason = reason
        super().__init__(f"retry after {delay_s:g} s" + (f": {reason}" if reason else ""))


class NotPausedError(NotFoundError):
    """Raised by retry and skip when no dead letter pauses the instance."""

    code = ErrorCode.not_paused

    def __init__(self, instance: str) -> None:
        self.instance = instance
        super().__init__(f"{instance} is not paused by a dead letter: there is nothing to retry or skip")

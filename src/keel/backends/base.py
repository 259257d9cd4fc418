"""The contract every engine implements, and the row types that cross it.

Engines speak JSON text and version numbers; encoding, key checks, typed values and the ``update()``
retry loop live above them (``keel.store``), written once for all engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

# Defined with the public read types (a leaf module): what an instance holds (stored by engines with its row), the
# message statuses the client reports and the outcomes of turn records.
from keel.records import InstanceKind as InstanceKind
from keel.records import MessageStatus as MessageStatus
from keel.records import TurnOutcome as TurnOutcome

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence
    from datetime import datetime


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One version of a key as an engine returns it.

    ``value_json`` is None for a tombstone: the key was deleted at ``version``.
    """

    key: str
    version: int
    value_json: str | None
    written_at: datetime
    writer: str


#: Versions kept per store key by default, the current one included.
DEFAULT_HISTORY_LIMIT = 100

#: Versions kept of a workflow instance's state, the current one included.
STATE_HISTORY_LIMIT = 10


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Settings every engine honours."""

    #: How many versions of a key ``history()`` keeps, the current one included; 0 keeps none beyond the current.
    history_limit: int = DEFAULT_HISTORY_LIMIT


class StoreEngine(Protocol):
    """A versioned key-value store with compare-and-swap writes.

    Every write is atomic: the current value, its history entry and the trimming of old history change
    together or not at all. Version numbers of a key start at 1, grow by one per write (a delete is a
    write, leaving a tombstone), and are never reused.
    """

    #: The URL the engine was opened with, password masked: safe to log and to put in errors.
    url: str

    async def get(self, key: str, /) -> StoredRecord | None:
        """Return the current version of ``key``, or None if it was never written or is deleted.

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def put(self, key: str, value_json: str, /, *, expected_version: int | None, writer: str) -> StoredRecord:
        """Write ``value_json`` as the next version if the current version is ``expected_version``.

        ``expected_version=None`` means the key must not exist (never written, or deleted).

        Returns:
            The record written.

        Raises:
            StaleWriteError: The current version is another one; nothing was written. Engines set its
                ``current`` to the live record they found (None if absent) when they have it at no extra cost.
            BackendUnavailable: The engine cannot be reached; the write may or may not have happened.
        """
        ...

    async def delete(self, key: str, /, *, expected_version: int, writer: str) -> StoredRecord:
        """Delete ``key`` if its current version is ``expected_version``, leaving a tombstone.

        Returns:
            The tombstone written (``value_json`` None), whose version is ``expected_version + 1``.

        Raises:
            StaleWriteError: The key is absent or at another version; nothing was written.
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def history(self, key: str, /, *, limit: int) -> list[StoredRecord]:
        """Return up to ``limit`` kept versions of ``key``, newest first, tombstones included.

        With a history limit of 0 the engine keeps no past versions and returns the current one alone.

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and threads. Safe to call twice."""
        ...


# --- The runtime: inboxes, leases and the atomic turn commit (G2, G3) -------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """One workflow instance of one app."""

    app: str
    workflow: str
    workflow_id: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append to an instance's inbox.

    ``delay_s`` makes it visible only that long after it is sent (by the backend's clock): a durable timer.
    ``kind`` is what the instance holds: the engine stores it with the instance row the first message creates, and
    goes by the stored kind (never by the name) where the two differ in handling (``Pruner.prune``). One instance's
    messages all carry the same kind; the first one's stands.
    """

    instance: InstanceRef
    message_id: str
    payload_json: str
    idempotency_key: str | None = None
    delay_s: float = 0.0
    kind: InstanceKind = InstanceKind.workflow


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one ``prune`` removed."""

    messages: int = 0
    turns: int = 0
    events: int = 0


@dataclass(frozen=True, slots=True)
class Claim:
    """A leased instance and the next message it must run, as the claiming worker received them.

    ``state_json`` is None and ``state_version`` 0 before the instance's first committed turn.
    """

    instance: InstanceRef
    fencing_token: int
    lease_expires_at: datetime
    message_id: str
    payload_json: str
    attempt: int
    state_json: str | None
    state_version: int
    #: Step name -> result JSON recorded for this message by earlier attempts: replayed, not run again.
    steps: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """A step's result, recorded durably for the claim's message before the turn goes on."""

    claim: Claim
    name: str
    result_json: str
    worker: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message whose turn failed for good, pausing its instance until it is retried or skipped."""

    instance: InstanceRef
    message_id: str
    error: str
    attempts: int
    failed_at: datetime


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append to its app's log, together with one delivery message per handler of its type.

    The engine stores the event row (for ``events()`` and the publish idempotency key) and sends each of
    ``deliveries`` as it would send any message; all in one transaction. An event whose id is already in the log
    is ignored with its deliveries: a repeated commit or publish appends nothing.
    """

    app: str
    event_id: str
    type: str
    payload_json: str
    #: The handlers it is delivered to, in the order of ``deliveries``.
    handlers: tuple[str, ...]
    #: One message per handler, each of kind ``InstanceKind.delivery`` (``keel.events`` builds them).
    deliveries: tuple[NewMessage, ...]
    #: The instance whose turn (or handler delivery) emitted it, and that turn's message; None when published.
    source: InstanceRef | None = None
    source_message_id: str | None = None
    #: Publishing again with the same key in the same app returns the first event's id and appends nothing.
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class EventRow:
    """An event as the log keeps it; ``seq`` grows with every event appended to the app's log."""

    app: str
    seq: int
    event_id: str
    type: str
    payload_json: str
    handlers: tuple[str, ...]
    source: InstanceRef | None
    source_message_id: str | None
    idempotency_key: str | None
    published_at: datetime


@dataclass(frozen=True, slots=True)
class TurnCommit:
    """What one successful turn writes, all or nothing.

    That is the new state, the message's completion, the turn record, the messages the turn sends and the
    events it emits (each with its deliveries). ``state_json`` None is a handler delivery's acknowledgement: no
    state is written, and the message's ``state_version`` and the turn record's ``version_written`` are the
    claim's ``state_version``.

    Its sends and events are first-wins on an idempotency key, where ``send`` and ``publish`` refuse a key used
    before with another payload: the commit carries the turn's state and completion with them, so refusing would
    either fail it forever (the worker would run the turn again and again, meeting the same key each time) or
    dead-letter a turn whose code succeeded, over a message someone else sent first. A key in ``ctx.send`` or
    ``ctx.emit`` says "once": the first proposal under it stands, and later ones are dropped, as the outbox's own
    reruns are.
    """

    claim: Claim
    state_json: str | None
    worker: str
    started_at: datetime
    duration_s: float
    #: Sent with the commit as ``send()`` sends (deduplicated by message id and idempotency key), but first wins:
    #: a key used before with another payload appends nothing and raises nothing (the class says why).
    sends: Sequence[NewMessage] = ()
    #: Appended with the commit as ``publish()`` appends, first-wins on an idempotency key as ``sends`` are.
    events: Sequence[NewEvent] = ()


@dataclass(frozen=True, slots=True)
class TurnFailure:
    """A turn that raised: its message is marked failed (with the error) and the instance is paused."""

    claim: Claim
    error: str
    worker: str
    started_at: datetime
    duration_s: float


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """A message's status; ``state_version`` is the version its turn committed, ``error`` why it failed."""

    message_id: str
    instance: InstanceRef
    status: MessageStatus
    state_version: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TurnRecordRow:
    """One turn as recorded: who ran it, under which token, from which version to which, and how it ended."""

    instance: InstanceRef
    message_id: str
    worker: str
    attempt: int
    fencing_token: int
    version_read: int
    version_written: int | None
    started_at: datetime
    duration_s: float
    outcome: TurnOutcome
    error: str | None = None


# --- The broker, in the roles its callers use ----------------------------------------------------------------
#
# Every method may raise ``BackendUnavailable`` (the engine cannot be reached, or the backend is closed); for a
# write, the write may or may not have happened then, and each write says how to repeat it safely. Writes are
# atomic: all of what a method writes, or nothing. Fenced writes (a claim's ``record_step``, ``commit_turn``,
# ``retry_turn``, ``fail_turn``) check the claim's token and lease by the backend's clock first, in the same
# transaction, and raise ``LeaseLostError`` having written nothing.


class Sender(Protocol):
    """Sending messages to instances and publishing events: what any process that starts work calls."""

    async def send(self, message: NewMessage, /) -> str:
        """Append ``message`` to its instance's inbox, after every message sent to it before, atomically.

        Idempotent: a message id sent before, or an idempotency key used before for the same instance (and not
        pruned) with the same payload, appends nothing and returns the first message's id. The key used before
        with another payload (its JSON text as stored, compared in the same transaction) is a conflict: nothing
        is appended and the first message is left as it was. A message with no delay wakes idle waiters of its
        app (see ``Claimer.wait_for_work``).

        Returns:
            The message's id, or the first message's id under the same idempotency key.

        Raises:
            IdempotencyConflictError: The idempotency key was used for the instance with another payload; it
                names the key, the instance and the first message's id.
            BackendUnavailable: The engine cannot be reached; the message may have been appended (send it again
                with the same id: that appends nothing if it was).
        """
        ...

    async def send_many(self, messages: Sequence[NewMessage], /) -> list[str]:
        """Send every message as ``send`` does, in order, in one transaction: all of them, or none.

        Each is deduplicated as ``send`` deduplicates it, against what was sent before and against the batch's own
        earlier messages: a key used twice in the batch for one instance with one payload appends once, and both
        get the first id. Messages to one instance join its inbox in the batch's order. It wakes idle waiters of
        every app it sends to (a message with no delay), as ``send`` does.

        Returns:
            For each message in order, its id, or the first message's id under the same idempotency key; none for
            an empty batch (and nothing is written).

        Raises:
            IdempotencyConflictError: A message's idempotency key was used for its instance with another payload,
                before or earlier in the batch; nothing of the batch was written.
            BackendUnavailable: The engine cannot be reached; the batch may have been written, whole (send it
                again with the same ids: that appends nothing if it was).
        """
        ...

    async def publish(self, event: NewEvent, /) -> str:
        """Append ``event`` to its app's log and send its deliveries, atomically; wake idle waiters.

        Idempotent: an event id already in the log, or an idempotency key an event still in the app's log was
        published under with the same type and payload, appends nothing (deliveries included). The key of an
        event of another type or payload (compared as stored, in the same transaction) is a conflict: nothing is
        appended. The handlers are not compared: they are the publishing process's registry, not the event.

        Returns:
            The event's id, or the first event's id under the same idempotency key.

        Raises:
            IdempotencyConflictError: The idempotency key was used in the app by an event of another type or
                payload; it names the key, the app and the first event's id.
            BackendUnavailable: The engine cannot be reached; the event may have been appended (publish it again
                with the same id: that appends nothing if it was).
        """
        ...


class Claimer(Protocol):
    """Claiming, renewing, stepping and settling turns, and waiting for work: what a worker calls.

    The wake rule, which the worker relies on: a wait returns at once for work sent (or made visible) since the
    later of the waiter's last claim's start and its last wait's return, and else parks until such work comes
    (or the timeout), without spinning on work that was there before.
    """

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """Lease up to ``limit`` instances that have a visible pending message, no live lease and no pause.

        An instance's next message is its pending message that became visible first (then the first sent): a
        delayed message never blocks the ones sent after it, and a message being retried or resolved keeps its
        place. Instances are taken in the order of their next messages. Each claim raises the instance's fencing
        token by one (tokens of an instance id never repeat, not even after ``delete_instance``) and sets its
        lease to expire ``lease_s`` seconds from now by the backend's clock. Atomic: concurrent claimers in any
        processes never lease one instance twice. It also starts the wake rule's "since" for ``app``.

        Returns:
            The claims, possibly none; none at all when ``limit`` is 0 or ``workflows`` empty.

        Raises:
            BackendUnavailable: The engine cannot be reached; a lease a lost reply took expires by itself.
        """
        ...

    async def wait_for_work(self, app: str, /, *, timeout_s: float) -> None:
        """Return when ``app`` may have work for this backend's claims, or after ``timeout_s`` at the latest.

        Follows the wake rule (see the class): a message sent (or a lease released, a dead letter resolved, a
        retry without delay) after the last claim began returns at once, even one sent before the wait began.
        A delayed message coming due or a retry's hold ending may be noticed only at the timeout. Returning
        early is allowed (the caller claims, and finds nothing); sleeping through work sent since is not.

        Raises:
            BackendUnavailable: The engine cannot be reached, or the backend is closed.
        """
        ...

    async def renew(self, claims: Sequence[Claim], /, *, lease_s: float) -> list[bool]:
        """Extend the leases still held under these claims' tokens to ``lease_s`` from the backend's now.

        Idempotent; an expired or released lease is not revived.

        Returns:
            For each claim, True if its lease was extended, False if it was lost.

        Raises:
            BackendUnavailable: The engine cannot be reached; the leases keep their old expiry or the new one.
        """
        ...

    async def release(self, claim: Claim, /) -> None:
        """Give the lease back without running the turn, if the claim's token is still current; else do nothing.

        Idempotent. The instance may be claimed again at once, so idle waiters are woken.

        Raises:
            BackendUnavailable: The engine cannot be reached; the lease expires by itself if it was not released.
        """
        ...

    async def record_step(self, step: StepRecord, /) -> None:
        """Durably record a step's result for the claim's message; later claims of it carry it in ``steps``.

        Fenced. Idempotent: a name already recorded for the message keeps its first result.

        Raises:
            LeaseLostError: The claim's token is no longer current, or its lease was released or expired; nothing
                was written.
            BackendUnavailable: The engine cannot be reached; the step may have been recorded (recording it again
                keeps the first result).
        """
        ...

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        """Commit a turn (state, completion, record, sends, events) and release its lease, atomically (G3).

        Fenced: it also compare-and-swaps the state on the version the claim read. The sends and events are
        deduplicated as ``send`` and ``publish`` deduplicate them, except that an idempotency key used before with
        another payload is never a conflict here: the first stands, and the commit goes on (``TurnCommit`` says why).
        They wake idle waiters of their apps.

        Returns:
            The new state version (the claim's own when ``state_json`` is None).

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease was released or expired;
                nothing was written.
            BackendUnavailable: The engine cannot be reached; the commit may have happened (read the message's
                status before running the turn again).
        """
        ...

    async def retry_turn(self, failure: TurnFailure, /, *, delay_s: float) -> None:
        """Record a failed attempt and let the message run again after ``delay_s``, atomically.

        Fenced. The turn record's outcome is ``TurnOutcome.retry``; the lease is released, but no one may claim the
        instance until ``delay_s`` from now by the backend's clock; the message stays pending and first in line, so
        the instance's later messages keep waiting behind it. A retry without delay wakes idle waiters.

        Raises:
            LeaseLostError: The claim's token is no longer current, or its lease was released or expired; nothing
                was written.
            BackendUnavailable: The engine cannot be reached; the retry may have been recorded.
        """
        ...

    async def fail_turn(self, failure: TurnFailure, /) -> None:
        """Dead-letter the message, pause the instance, record the turn and release the lease, atomically (G6).

        Fenced.

        Raises:
            LeaseLostError: The claim's token is no longer current, or its lease was released or expired; nothing
                was written.
            BackendUnavailable: The engine cannot be reached; the failure may have been recorded.
        """
        ...


class Reader(Protocol):
    """Reading states, turn records, messages, events and dead letters: one consistent snapshot per call."""

    async def message(self, app: str, message_id: str, /) -> MessageInfo | None:
        """Return the status of a message, or None if no such message was sent to ``app`` (or it was pruned).

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def wait_for_end(self, app: str, message_id: str, /, *, timeout_s: float) -> MessageInfo | None:
        """Return the message's status as soon as it has ended (done, failed or skipped), or at ``timeout_s``.

        The engine announces each end as part of the write that makes it (``commit_turn``, ``fail_turn``,
        ``resolve_dead_letter`` with ``skip``), whichever process makes it, and the wait wakes on that announcement
        instead of polling. Nothing is missed: an end committed before the wait began returns at once, and one
        committed during the wait wakes it promptly, even if the engine's listener reconnected in between (every
        wait reads the status again after a reconnect); an announcement that may be lost (a datagram) is made up for
        by reading the status again now and then (at most about a second apart on such engines). Any number of
        concurrent waits share the backend's one listener and hold no pooled connection while parked.

        Returns:
            The status read last: final (not pending) when the message ended; pending at the timeout; None if no
            such message was sent to ``app`` (or it was pruned, or deleted with its instance; then soon after).

        Raises:
            BackendUnavailable: The engine cannot be reached, or the backend is closed (parked waits too).
        """
        ...

    async def state(self, instance: InstanceRef, /) -> StoredRecord | None:
        """Return the instance's committed state, or None before its first committed turn.

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def turns(self, instance: InstanceRef, /, *, limit: int) -> list[TurnRecordRow]:
        """Return up to ``limit`` of the instance's kept turn records, newest first (none for a limit below 1).

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def events(self, app: str, /, *, limit: int) -> list[EventRow]:
        """Return the app's last ``limit`` events, newest first (none for a limit below 1).

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...

    async def dead_letters(self, app: str, /, *, limit: int) -> list[DeadLetter]:
        """Return up to ``limit`` of the app's dead-lettered messages (status failed), newest failure first.

        Raises:
            BackendUnavailable: The engine cannot be reached.
        """
        ...


class Operator(Protocol):
    """Acting on instances by hand: resolving dead letters and deleting instances (``keel retry``, ``skip``)."""

    async def resolve_dead_letter(self, instance: InstanceRef, /, *, skip: bool) -> str | None:
        """Un-pause an instance paused by a dead letter, atomically; wake idle waiters if it was.

        With ``skip=False`` the dead message becomes pending again with its attempts reset, to run first; with
        ``skip=True`` it is marked skipped and the instance goes on with its next message. Idempotent in effect:
        a second call finds the instance not paused and changes nothing.

        Returns:
            The dead message's id, or None (nothing changed) if the instance is unknown or not paused.

        Raises:
            BackendUnavailable: The engine cannot be reached; the instance may have been resolved.
        """
        ...

    async def delete_instance(self, instance: InstanceRef, /) -> bool:
        """Delete an instance and everything it owns, atomically.

        That is its state and state history, its messages of every status, their step records, its turn records
        and its idempotency keys. A worker holding its lease can no longer commit (``LeaseLostError``); its
        fencing tokens go on from the last one if the instance is sent a message again. Idempotent.

        Returns:
            True if the instance existed.

        Raises:
            BackendUnavailable: The engine cannot be reached; the instance may have been deleted.
        """
        ...


class Pruner(Protocol):
    """Removing what an app no longer needs: what a worker calls now and then (``keel.retention``)."""

    async def prune(self, app: str, /, *, finished_before: datetime, keys_before: datetime) -> Pruned:
        """Delete what the app no longer needs, never anything undelivered or dead-lettered.

        Removes messages that are done or skipped and finished before ``finished_before`` (with their step
        records), except those with an idempotency key sent at or after ``keys_before``, which stay so that
        the key keeps deduplicating; turn records started before ``finished_before``; events published before
        ``finished_before`` (but those whose idempotency key was used at or after ``keys_before``); and the
        instance rows of handler deliveries (stored as ``InstanceKind.delivery``) whose one message was removed
        here, whole: their ids are never reused, so nothing (no fencing token) needs to outlive them. A workflow
        instance's row always stays, with its fencing token, state and history. Runs in batches, each atomic;
        idempotent: pruning again removes only what became due since.

        Returns:
            How many messages, turn records and events were removed.

        Raises:
            BackendUnavailable: The engine cannot be reached; the batches before it stay pruned.
        """
        ...


class Broker(Sender, Claimer, Reader, Operator, Pruner, Protocol):
    """Inboxes of workflow instances, leases with fencing tokens, the atomic turn commit and the event log."""


class WorkerBackend(Claimer, Pruner, Protocol):
    """What a worker uses: claiming and settling turns, pruning, and the URL for its logs."""

    @property
    def url(self) -> str:
        """The URL the backend was opened with, password masked."""
        ...


class ClientBackend(Sender, Reader, Operator, Protocol):
    """What a client uses: sending, reading and operating (never claiming), and the URL for its errors."""

    @property
    def url(self) -> str:
        """The URL the backend was opened with, password masked."""
        ...


class Backend(Broker, Protocol):
    """One engine's store and broker, sharing its connections; what ``open_backend(url)`` returns."""

    @property
    def url(self) -> str:
        """The URL the backend was opened with, password masked: safe to log and to put in errors."""
        ...

    @property
    def store(self) -> StoreEngine:
        """The engine's store, on the same connections as the broker."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads. Safe to call twice."""
        ...

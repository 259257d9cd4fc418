"""The in-process engine, for unit tests: ``memory://`` or ``memory://NAME``.

One process only. Every store opened with the same URL in one process shares one dict, so a test's
client and an in-process worker see the same data; another process sees nothing of it, and nothing
survives the process. It passes the same conformance suite as the real engines.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from keel.backends.base import (
    STATE_HISTORY_LIMIT,
    Claim,
    DeadLetter,
    EventRow,
    InstanceRef,
    MessageInfo,
    MessageStatus,
    NewEvent,
    NewMessage,
    Pruned,
    StepRecord,
    StoredRecord,
    StoreEngine,
    StoreOptions,
    TurnCommit,
    TurnFailure,
    TurnRecordRow,
    is_delivery,
)
from keel.errors import LeaseLostError, StaleWriteError

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence


class _Space:
    """The data behind one ``memory://NAME`` URL."""

    def __init__(self) -> None:
        self.current: dict[str, StoredRecord] = {}
        self.past: dict[str, deque[StoredRecord]] = {}
        self.runtime = _Runtime()


_SPACES: dict[str, _Space] = {}


def _space_name(url: str) -> str:
    return url.split("://", 1)[1].strip("/")


class MemoryStore:
    """A versioned store in this process's memory; no awaits inside a write, so each write is atomic."""

    def __init__(self, url: str, options: StoreOptions) -> None:
        self.url = url
        self._options = options
        self._space = _SPACES.setdefault(_space_name(url), _Space())

    async def get(self, key: str, /) -> StoredRecord | None:
        """Return the current version of ``key``, or None."""
        record = self._space.current.get(key)
        return None if record is None or record.value_json is None else record

    async def put(self, key: str, value_json: str, /, *, expected_version: int | None, writer: str) -> StoredRecord:
        """Compare-and-swap ``key`` to ``value_json``."""
        return self._write(key, value_json, expected_version=expected_version, writer=writer)

    async def delete(self, key: str, /, *, expected_version: int, writer: str) -> StoredRecord:
        """Delete ``key`` at ``expected_version``, leaving a tombstone."""
        return self._write(key, None, expected_version=expected_version, writer=writer)

    async def history(self, key: str, /, *, limit: int) -> list[StoredRecord]:
        """Return kept versions of ``key``, newest first."""
        if self._options.history_limit == 0:
            record = self._space.current.get(key)
            return [record] if record is not None else []
        return list(reversed(self._space.past.get(key, ())))[:limit]

    async def aclose(self) -> None:
        """Nothing to release: the data stays for other stores of this process."""

    def _write(self, key: str, value_json: str | None, *, expected_version: int | None, writer: str) -> StoredRecord:
        existing = self._space.current.get(key)
        live_version = existing.version if existing is not None and existing.value_json is not None else None
        if live_version != expected_version:
            raise StaleWriteError(key, expected_version, live_version, current=existing if live_version else None)
        version = existing.version + 1 if existing is not None else 1
        record = StoredRecord(key, version, value_json, datetime.now(UTC), writer)
        self._space.current[key] = record
        limit = self._options.history_limit
        if limit > 0:
            self._space.past.setdefault(key, deque(maxlen=limit)).append(record)
        return record


@dataclass
class _Message:
    info: MessageInfo
    payload_json: str
    seq: int
    attempts: int = 0
    steps: dict[str, str] = field(default_factory=dict)
    failed_at: datetime | None = None
    sent_at: datetime = field(default_factory=lambda: _now())
    visible_at: datetime = field(default_factory=lambda: _now())
    finished_at: datetime | None = None
    idempotency_key: str | None = None


@dataclass
class _Instance:
    ref: InstanceRef
    token: int = 0
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    paused: bool = False
    state: StoredRecord | None = None
    pending: deque[str] = field(default_factory=deque)
    history: deque[StoredRecord] = field(default_factory=lambda: deque(maxlen=STATE_HISTORY_LIMIT))
    turns: list[TurnRecordRow] = field(default_factory=list)


class _Runtime:
    """Inboxes, leases and turn records of every app in one memory space."""

    def __init__(self) -> None:
        self.instances: dict[InstanceRef, _Instance] = {}
        self.messages: dict[tuple[str, str], _Message] = {}
        self.idempotency: dict[tuple[InstanceRef, str], str] = {}
        self.seq = 0
        self.events: dict[tuple[str, str], EventRow] = {}
        self.event_keys: dict[tuple[str, str], str] = {}
        self.event_seq = 0
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}


class MemoryBackend(MemoryStore):
    """The store plus the broker of one ``memory://`` space; every method runs without awaiting, so atomically."""

    def __init__(self, url: str, options: StoreOptions) -> None:
        super().__init__(url, options)
        self.store: StoreEngine = self
        self._rt = self._space.runtime

    async def send(self, message: NewMessage, /) -> str:
        """Append ``message`` to its instance's inbox, or return the first id sent under its idempotency key."""
        message_id = self._send(message)
        self._wake(message.instance.app)
        return message_id

    async def publish(self, event: NewEvent, /) -> str:
        """Append ``event`` and send its deliveries, or return the first id published under its key."""
        event_id = self._publish(event)
        self._wake(event.app)
        return event_id

    async def events(self, app: str, /, *, limit: int) -> list[EventRow]:
        """Return the app's last ``limit`` events, newest first."""
        rows = [row for (a, _), row in self._rt.events.items() if a == app]
        rows.sort(key=lambda row: row.seq, reverse=True)
        return rows[:limit]

    def _publish(self, event: NewEvent) -> str:
        rt = self._rt
        if (event.app, event.event_id) in rt.events:
            return event.event_id
        if event.idempotency_key is not None:
            first = rt.event_keys.get((event.app, event.idempotency_key))
            if first is not None:
                return first
            rt.event_keys[(event.app, event.idempotency_key)] = event.event_id
        rt.event_seq += 1
        rt.events[(event.app, event.event_id)] = EventRow(
            event.app,
            rt.event_seq,
            event.event_id,
            event.type,
            event.payload_json,
            event.handlers,
            event.source,
            event.source_message_id,
            event.idempotency_key,
            _now(),
        )
        for delivery in event.deliveries:
            self._send(delivery)
        return event.event_id

    def _wake(self, app: str) -> None:
        for waiter in self._rt.waiters.pop(app, []):
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)

    def _send(self, message: NewMessage) -> str:
        rt = self._rt
        if (message.instance.app, message.message_id) in rt.messages:
            return message.message_id  # a resend of the same message (a retry after a lost reply) appends nothing
        if message.idempotency_key is not None:
            first = rt.idempotency.get((message.instance, message.idempotency_key))
            if first is not None:
                return first
            rt.idempotency[(message.instance, message.idempotency_key)] = message.message_id
        rt.seq += 1
        info = MessageInfo(message.message_id, message.instance, MessageStatus.pending)
        now = _now()
        rt.messages[(message.instance.app, message.message_id)] = _Message(
            info,
            message.payload_json,
            rt.seq,
            sent_at=now,
            visible_at=now + timedelta(seconds=message.delay_s),
            idempotency_key=message.idempotency_key,
        )
        self._instance(message.instance).pending.append(message.message_id)
        return message.message_id

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """Lease up to ``limit`` claimable instances, oldest pending message first."""
        now = _now()
        ready = [
            (message, inst)
            for inst in self._rt.instances.values()
            if inst.ref.app == app
            and inst.ref.workflow in workflows
            and not inst.paused
            and (inst.lease_expires_at is None or inst.lease_expires_at <= now)
            and (message := self._next(inst)) is not None
            and message.visible_at <= now
        ]
        ready.sort(key=lambda pair: (pair[0].visible_at, pair[0].seq))
        expires_at = now + timedelta(seconds=lease_s)
        return [self._lease(inst, message, worker, expires_at) for message, inst in ready[:limit]]

    async def renew(self, claims: Sequence[Claim], /, *, lease_s: float) -> list[bool]:
        """Extend each lease still held under its claim's token."""
        now = _now()
        held = []
        for claim in claims:
            inst = self._rt.instances.get(claim.instance)
            ok = inst is not None and self._lease_problem(inst, claim, now) is None
            if inst is not None and ok:
                inst.lease_expires_at = now + timedelta(seconds=lease_s)
            held.append(ok)
        return held

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        """Write the new state, complete the message, record the turn and release the lease."""
        claim = commit.claim
        inst, message = self._fenced(claim)
        version = claim.state_version
        if commit.state_json is not None:
            version += 1
            inst.state = StoredRecord(_state_key(claim.instance), version, commit.state_json, _now(), commit.worker)
            inst.history.append(inst.state)
        inst.pending.remove(claim.message_id)
        message.info = replace(message.info, status=MessageStatus.done, state_version=version)
        message.finished_at = _now()
        self._record(commit, claim, version_written=version, outcome="committed", error=None)
        self._release(inst)
        for sent in commit.sends:
            self._send(sent)
        for event in commit.events:
            self._publish(event)
        if commit.sends or commit.events:
            self._wake(claim.instance.app)
        return version

    async def fail_turn(self, failure: TurnFailure, /) -> None:
        """Mark the message failed, pause the instance, record the turn and release the lease."""
        claim = failure.claim
        inst, message = self._fenced(claim)
        message.info = replace(message.info, status=MessageStatus.failed, error=failure.error)
        message.failed_at = _now()
        inst.paused = True
        self._record(failure, claim, version_written=None, outcome="failed", error=failure.error)
        self._release(inst)

    async def release(self, claim: Claim, /) -> None:
        """Give back the lease if the claim's token is still current."""
        inst = self._rt.instances.get(claim.instance)
        if inst is not None and inst.token == claim.fencing_token and inst.lease_owner is not None:
            self._release(inst)  # not after a retry: that would cut its hold short

    async def record_step(self, step: StepRecord, /) -> None:
        """Record a step's result for the claim's message (the first result of a name stands)."""
        _, message = self._fenced(step.claim)
        message.steps.setdefault(step.name, step.result_json)

    async def retry_turn(self, failure: TurnFailure, /, *, delay_s: float) -> None:
        """Record the failed attempt; hold the instance for ``delay_s``, its message first in line."""
        claim = failure.claim
        inst, _ = self._fenced(claim)
        self._record(failure, claim, version_written=None, outcome="retry", error=failure.error)
        inst.lease_owner = None
        inst.lease_expires_at = _now() + timedelta(seconds=delay_s)

    async def dead_letters(self, app: str, /, *, limit: int) -> list[DeadLetter]:
        """Return the app's dead-lettered messages, newest first."""
        dead = [m for (a, _), m in self._rt.messages.items() if a == app and m.info.status is MessageStatus.failed]
        dead.sort(key=lambda m: (m.failed_at or _now(), m.seq), reverse=True)
        return [
            DeadLetter(m.info.instance, m.info.message_id, m.info.error or "", m.attempts, m.failed_at or _now())
            for m in dead[:limit]
        ]

    async def resolve_dead_letter(self, instance: InstanceRef, /, *, skip: bool) -> str | None:
        """Retry or skip the dead message of a paused instance, and un-pause it."""
        inst = self._rt.instances.get(instance)
        dead = [] if inst is None or not inst.paused else self._dead_of(inst)
        if inst is None or not dead:
            return None
        message = dead[0]
        if skip:
            message.info = replace(message.info, status=MessageStatus.skipped)
            message.finished_at = _now()
            inst.pending.remove(message.info.message_id)
        else:
            message.info = replace(message.info, status=MessageStatus.pending, error=None)
            message.attempts = 0
        inst.paused = False
        return message.info.message_id

    async def message(self, app: str, message_id: str, /) -> MessageInfo | None:
        """Return a message's status, or None."""
        found = self._rt.messages.get((app, message_id))
        return None if found is None else found.info

    async def state(self, instance: InstanceRef, /) -> StoredRecord | None:
        """Return the instance's committed state, or None."""
        inst = self._rt.instances.get(instance)
        return None if inst is None else inst.state

    async def turns(self, instance: InstanceRef, /, *, limit: int) -> list[TurnRecordRow]:
        """Return the instance's turn records, newest first."""
        inst = self._rt.instances.get(instance)
        return [] if inst is None else list(reversed(inst.turns))[:limit]

    async def wait_for_work(self, app: str, /, *, timeout_s: float) -> None:
        """Return when a message is sent to ``app``, or after ``timeout_s``."""
        waiter = asyncio.get_running_loop().create_future()
        self._rt.waiters.setdefault(app, []).append(waiter)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, timeout_s)

    async def prune(self, app: str, /, *, finished_before: datetime, keys_before: datetime) -> Pruned:
        """Delete finished messages (but recent idempotency keys) and turn records older than the cut-offs."""
        finished = (MessageStatus.done, MessageStatus.skipped)
        doomed = [
            key
            for key, m in self._rt.messages.items()
            if key[0] == app
            and m.info.status in finished
            and m.finished_at is not None
            and m.finished_at < finished_before
            and (m.idempotency_key is None or m.sent_at < keys_before)
        ]
        for key in doomed:
            message = self._rt.messages.pop(key)
            if message.idempotency_key is not None:
                self._rt.idempotency.pop((message.info.instance, message.idempotency_key), None)
            if is_delivery(message.info.instance.workflow):
                self._rt.instances.pop(message.info.instance, None)
        turns = 0
        for inst in self._rt.instances.values():
            if inst.ref.app == app:
                kept = [t for t in inst.turns if t.started_at >= finished_before]
                turns += len(inst.turns) - len(kept)
                inst.turns = kept
        old_events = [
            key
            for key, row in self._rt.events.items()
            if key[0] == app
            and row.published_at < finished_before
            and (row.idempotency_key is None or row.published_at < keys_before)
        ]
        for key in old_events:
            row = self._rt.events.pop(key)
            if row.idempotency_key is not None:
                self._rt.event_keys.pop((app, row.idempotency_key), None)
        return Pruned(messages=len(doomed), turns=turns, events=len(old_events))

    async def delete_instance(self, instance: InstanceRef, /) -> bool:
        """Delete an instance with its state, messages, steps, turn records and idempotency keys."""
        inst = self._rt.instances.pop(instance, None)
        for key in [k for k, m in self._rt.messages.items() if m.info.instance == instance]:
            del self._rt.messages[key]
        for idem in [k for k in self._rt.idempotency if k[0] == instance]:
            del self._rt.idempotency[idem]
        return inst is not None

    def _next(self, inst: _Instance) -> _Message | None:
        """The instance's next message: the pending one that became visible first, then the first sent."""
        pending = [self._rt.messages[(inst.ref.app, mid)] for mid in inst.pending]
        live = [m for m in pending if m.info.status is MessageStatus.pending]
        return min(live, key=lambda m: (m.visible_at, m.seq), default=None)

    def _dead_of(self, inst: _Instance) -> list[_Message]:
        pending = [self._rt.messages[(inst.ref.app, mid)] for mid in inst.pending]
        return [m for m in pending if m.info.status is MessageStatus.failed]

    def _instance(self, ref: InstanceRef) -> _Instance:
        inst = self._rt.instances.get(ref)
        if inst is None:
            inst = self._rt.instances[ref] = _Instance(ref)
        return inst

    def _lease(self, inst: _Instance, message: _Message, worker: str, expires_at: datetime) -> Claim:
        inst.token += 1
        inst.lease_owner, inst.lease_expires_at = worker, expires_at
        message.attempts += 1
        state = inst.state
        return Claim(
            inst.ref,
            inst.token,
            expires_at,
            message.info.message_id,
            message.payload_json,
            message.attempts,
            None if state is None else state.value_json,
            0 if state is None else state.version,
            dict(message.steps),
        )

    def _fenced(self, claim: Claim) -> tuple[_Instance, _Message]:
        inst = self._rt.instances.get(claim.instance)
        if inst is None:
            raise LeaseLostError(_describe(claim.instance), claim.fencing_token, "the instance was deleted")
        problem = self._lease_problem(inst, claim, _now())
        if problem is not None:
            raise LeaseLostError(_describe(claim.instance), claim.fencing_token, problem)
        return inst, self._rt.messages[(claim.instance.app, claim.message_id)]

    @staticmethod
    def _lease_problem(inst: _Instance, claim: Claim, now: datetime) -> str | None:
        if inst.token != claim.fencing_token:
            return f"the instance moved on to fencing token {inst.token}"
        if inst.lease_owner is None:
            return "the lease was released"
        if inst.lease_expires_at is None or inst.lease_expires_at <= now:
            return "the lease expired"
        return None

    @staticmethod
    def _release(inst: _Instance) -> None:
        inst.lease_owner = inst.lease_expires_at = None

    def _record(
        self,
        done: TurnCommit | TurnFailure,
        claim: Claim,
        *,
        version_written: int | None,
        outcome: str,
        error: str | None,
    ) -> None:
        self._rt.instances[claim.instance].turns.append(
            TurnRecordRow(
                claim.instance,
                claim.message_id,
                done.worker,
                claim.attempt,
                claim.fencing_token,
                claim.state_version,
                version_written,
                done.started_at,
                done.duration_s,
                outcome,
                error,
            )
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _state_key(ref: InstanceRef) -> str:
    return f"{ref.workflow}/{ref.workflow_id}"


def _describe(ref: InstanceRef) -> str:
    return f"{ref.app}:{ref.workflow}/{ref.workflow_id}"


async def open_backend(url: str, options: StoreOptions) -> MemoryBackend:
    """Open the ``memory://`` space that ``url`` names, store and broker."""
    return MemoryBackend(url, options)


async def open_engine(url: str, options: StoreOptions) -> MemoryStore:
    """Open the ``memory://`` space that ``url`` names."""
    return MemoryStore(url, options)


def reset(name: str | None = None) -> None:
    """Forget one memory space (or all of them); for tests."""
    if name is None:
        _SPACES.clear()
    else:
        _SPACES.pop(name, None)

"""The PostgreSQL broker: inboxes, leases with fencing tokens, and the atomic turn commit (G2, G3).

Tables (``schema.sql``, steps ``runtime_v1`` to ``runtime_v3``): ``keel_instances`` holds one row per workflow
instance with its lease, fencing token, committed state and its next message, ``(next_visible_at, next_seq)``: the
pending message with the smallest ``(visible_at, seq)`` (NULL when its inbox is empty; a failed message stays next
while it pauses the instance); ``keel_messages`` the inboxes, each message with the seq it was sent under and the
time it becomes visible (``sent_at`` plus the send's ``delay_s``, by the server's clock: a durable timer);
``keel_state_history`` the last states; ``keel_turns`` one record per turn; ``keel_steps`` the step results recorded
per message; ``keel_instance_tombstones`` the last fencing token of each deleted instance. Statements are in
``broker.sql``.

A lease is live while the instance's ``fencing_token`` is the claim's, ``lease_owner`` is set and
``lease_expires_at`` is after ``clock_timestamp()``. Commit, fail and release clear both; a retry clears the owner
only, leaving ``lease_expires_at`` at the end of the retry delay, which keeps claims (they look at that column
alone) off the instance until then.

How each operation stays atomic and fenced:

- ``send``: one transaction. It locks the instance row (creating it), then appends the message, makes it the
  instance's next one if it becomes visible before the current next one (unless a dead letter pauses the instance:
  it stays next), and notifies the app's channel, delivered at commit (not for a timer, which is no work yet; idle
  workers find it by polling once it is due). Locking first makes the messages of one inbox draw their seq in commit
  order, and lets the idempotency check see every earlier send. A send that has just created an instance again after
  ``delete_instance`` takes over its tombstone's fencing token in the same statement, so tokens of one instance id
  only ever grow: a claim on the deleted instance can never match a lease of the new one. (The tombstone is read by
  the second statement, whose snapshot is taken once the row lock is held, so it sees the tombstone of a delete it
  waited for.)
- ``claim``: one transaction. ``FOR UPDATE SKIP LOCKED`` locks claimable instance rows (next message visible by the
  server's clock, not paused, lease absent or expired by ``clock_timestamp()``) in ``(next_visible_at, next_seq)``
  order, so concurrent claimers in any process take disjoint rows; a second statement raises their tokens, sets the
  leases and counts the attempts. A retried message (a ``retry_turn`` hold) and a dead letter sent back keep their
  ``(visible_at, seq)``, so they stay first.
- ``commit_turn``, ``fail_turn``, ``record_step`` and ``retry_turn``: one transaction. It locks the instance row,
  then one statement writes everything under the condition that the lease is live (by the server's clock, read
  after the lock is held); when that condition fails nothing is written and ``LeaseLostError`` says why, from the
  locked row. ``_commit_in``/``_fail_in`` take an open transaction, so that several commits, and later a turn's
  events, can share one. A step keeps its first result: the insert does nothing on a name already recorded.
- ``resolve_dead_letter``: one transaction. It locks the instance row (so sends, claims and other resolves of it
  wait), then one statement finds the failed message at ``next_seq`` of the paused instance, makes it pending
  again (attempts 0) or skipped, recomputes the instance's next message, un-pauses the instance and notifies
  the app's channel; it finds nothing, and changes nothing, when the instance is not paused by a failed message.
- ``delete_instance``: one transaction. It locks the instance row (so sends, claims and fenced writes of it wait),
  then one statement deletes the instance, its messages (their steps by cascade), state history and turn records
  and records its fencing token in a tombstone. A fenced write waiting on the row then finds no row and raises
  ``LeaseLostError`` ("the instance was deleted"); a later send starts the instance afresh at state version 0.
- ``prune``: batches of ``PRUNE_BATCH`` messages and turn records, each batch one statement (its own transaction),
  repeated until a batch finds less than a full one, so one call prunes everything that is due. Only done or
  skipped messages are deleted, which nothing ever changes again, and rows another pruner holds are skipped.
- ``renew``, ``release``: one fenced statement each.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keel.backends._sql import load_queries
from keel.backends.base import (
    STATE_HISTORY_LIMIT,
    Claim,
    DeadLetter,
    InstanceRef,
    MessageInfo,
    MessageStatus,
    NewMessage,
    Pruned,
    StepRecord,
    StoredRecord,
    TurnCommit,
    TurnFailure,
    TurnRecordRow,
)
from keel.backends.postgres.store import _fetch_one
from keel.errors import LeaseLostError

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence
    from typing import LiteralString

    import psycopg
    from psycopg.rows import TupleRow

    from keel.backends.postgres.store import PostgresStore

#: The broker's statements, by name (``broker.sql``).
BROKER_QUERIES = load_queries(__package__ or __name__, "broker.sql")

#: How many messages, and how many turn records, one statement of ``prune`` deletes at most; it repeats until done.
PRUNE_BATCH = 1000

#: How much of an app's name its channel name shows, to make it recognisable in ``pg_listening_channels()``.
_READABLE_CHARS = 24

_UNSAFE = re.compile(r"[^a-z0-9_]")


def channel_for(schema: str, app: str) -> str:
    """Return the NOTIFY channel of ``app``'s messages in ``schema``: a lower-case identifier under 63 bytes.

    A digest of both names keeps apart names that differ only in what the readable part drops, and keeps apps
    (or tests) in different schemas of one database from waking each other.
    """
    readable = _UNSAFE.sub("_", app.lower())[:_READABLE_CHARS]
    digest = hashlib.blake2b(f"{schema}\0{app}".encode(), digest_size=8).hexdigest()
    return f"keel_{readable}_{digest}"


class PostgresBroker:
    """Inboxes, leases and turn commits in the tables of one PostgreSQL schema, over the store's pool."""

    def __init__(self, store: PostgresStore, schema: str) -> None:
        self._store = store
        self._schema = schema

    async def send(self, message: NewMessage, /) -> str:
        """Append ``message`` to its inbox and wake the app's listeners, unless its id or idempotency key was used.

        Returns:
            The message's id, or the id of the message first sent under the same idempotency key.

        Raises:
            BackendUnavailable: The server cannot be reached; the message may or may not have been appended.
        """
        params = {
            **_instance_params(message.instance),
            "message_id": message.message_id,
            "payload": message.payload_json,
            "idempotency_key": message.idempotency_key,
            "delay_s": float(message.delay_s),
            "channel": channel_for(self._schema, message.instance.app),
        }
        async with self._store._connection() as conn, conn.transaction():
            await conn.execute(BROKER_QUERIES["lock_inbox"], params)
            row = await _fetch_one(conn, BROKER_QUERIES["append"], params)
        assert row is not None  # the statement always returns its one row
        return str(row[0])

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """Lease up to ``limit`` claimable instances of ``app`` in ``workflows``, earliest visible message first."""
        if limit <= 0 or not workflows:
            return []
        wanted = {"app": app, "workflows": list(workflows), "limit": limit}
        async with self._store._connection() as conn, conn.transaction():
            cursor = await conn.execute(BROKER_QUERIES["lock_ready"], wanted)
            picked = await cursor.fetchall()
            if not picked:
                return []
            lease = {
                "app": app,
                "workflows": [row[0] for row in picked],
                "workflow_ids": [row[1] for row in picked],
                "worker": worker,
                "lease_s": lease_s,
            }
            cursor = await conn.execute(BROKER_QUERIES["lease"], lease)
            rows = await cursor.fetchall()
        return [_claim(app, row) for row in rows]

    async def renew(self, claims: Sequence[Claim], /, *, lease_s: float) -> list[bool]:
        """Extend each lease still live under its claim's token, by ``lease_s`` from the server's now."""
        if not claims:
            return []
        params = {
            "apps": [c.instance.app for c in claims],
            "workflows": [c.instance.workflow for c in claims],
            "workflow_ids": [c.instance.workflow_id for c in claims],
            "tokens": [c.fencing_token for c in claims],
            "lease_s": lease_s,
        }
        async with self._store._connection() as conn:
            cursor = await conn.execute(BROKER_QUERIES["renew"], params)
            renewed = {InstanceRef(*row) for row in await cursor.fetchall()}
        return [c.instance in renewed for c in claims]

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        """Commit a turn atomically and release its lease; return the new state version.

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease expired; nothing was written.
            BackendUnavailable: The server cannot be reached; the commit may or may not have happened.
        """
        async with self._store._connection() as conn, conn.transaction():
            return await _commit_in(conn, commit)

    async def fail_turn(self, failure: TurnFailure, /) -> None:
        """Mark the message failed, pause the instance, record the turn and release the lease, atomically.

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease expired; nothing was written.
            BackendUnavailable: The server cannot be reached.
        """
        async with self._store._connection() as conn, conn.transaction():
            await _fail_in(conn, failure)

    async def release(self, claim: Claim, /) -> None:
        """Give the lease back if the claim's token is still current; otherwise do nothing."""
        params = {**_instance_params(claim.instance), "fencing_token": claim.fencing_token}
        async with self._store._connection() as conn:
            await conn.execute(BROKER_QUERIES["release"], params)

    async def record_step(self, step: StepRecord, /) -> None:
        """Durably record a step's result for the claim's message; a name already recorded keeps its first result.

        Raises:
            LeaseLostError: The lease is no longer live (moved on, expired or released); nothing was written.
            BackendUnavailable: The server cannot be reached; the step may or may not have been recorded.
        """
        claim = step.claim
        params = {
            **_instance_params(claim.instance),
            "message_id": claim.message_id,
            "fencing_token": claim.fencing_token,
            "name": step.name,
            "result": step.result_json,
            "worker": step.worker,
            "duration_s": step.duration_s,
        }
        async with self._store._connection() as conn, conn.transaction():
            await _fenced(conn, claim, BROKER_QUERIES["record_step"], params)

    async def retry_turn(self, failure: TurnFailure, /, *, delay_s: float) -> None:
        """Record a failed attempt and release the lease, holding the instance for ``delay_s``, atomically.

        Raises:
            LeaseLostError: The lease is no longer live (moved on, expired or released); nothing was written.
            BackendUnavailable: The server cannot be reached; the retry may or may not have been recorded.
        """
        claim = failure.claim
        params = {
            **_turn_params(claim, failure.worker, failure.started_at, failure.duration_s),
            "error": failure.error,
            "delay_s": float(delay_s),
        }
        async with self._store._connection() as conn, conn.transaction():
            await _fenced(conn, claim, BROKER_QUERIES["retry_turn"], params)

    async def dead_letters(self, app: str, /, *, limit: int) -> list[DeadLetter]:
        """Return the app's dead-lettered messages (status failed), newest failure first."""
        async with self._store._connection() as conn:
            cursor = await conn.execute(BROKER_QUERIES["dead_letters"], {"app": app, "limit": max(limit, 0)})
            rows = await cursor.fetchall()
        return [
            DeadLetter(InstanceRef(app, workflow, workflow_id), message_id, error, int(attempts), _utc(failed_at))
            for workflow, workflow_id, message_id, error, attempts, failed_at in rows
        ]

    async def resolve_dead_letter(self, instance: InstanceRef, /, *, skip: bool) -> str | None:
        """Retry (``skip=False``) or skip the failed message pausing ``instance``, and un-pause it, atomically.

        Returns:
            The dead message's id, or None (nothing changed) if the instance is unknown or not paused by one.

        Raises:
            BackendUnavailable: The server cannot be reached; the instance may or may not have been resolved.
        """
        params = {**_instance_params(instance), "skip": skip, "channel": channel_for(self._schema, instance.app)}
        async with self._store._connection() as conn, conn.transaction():
            if await _fetch_one(conn, BROKER_QUERIES["lock_instance"], params) is None:
                return None
            row = await _fetch_one(conn, BROKER_QUERIES["resolve_dead_letter"], params)
        return None if row is None else str(row[0])

    async def message(self, app: str, message_id: str, /) -> MessageInfo | None:
        """Return a message's status, or None if no such message was sent to ``app``."""
        async with self._store._connection() as conn:
            row = await _fetch_one(conn, BROKER_QUERIES["message"], {"app": app, "message_id": message_id})
        if row is None:
            return None
        workflow, workflow_id, status, state_version, error = row
        return MessageInfo(
            message_id, InstanceRef(app, workflow, workflow_id), MessageStatus(status), state_version, error
        )

    async def state(self, instance: InstanceRef, /) -> StoredRecord | None:
        """Return the instance's committed state, or None before its first committed turn."""
        async with self._store._connection() as conn:
            row = await _fetch_one(conn, BROKER_QUERIES["state"], _instance_params(instance))
        if row is None:
            return None
        version, state, written_at, writer = row
        return StoredRecord(
            f"{instance.workflow}/{instance.workflow_id}", int(version), state, _utc(written_at), writer
        )

    async def turns(self, instance: InstanceRef, /, *, limit: int) -> list[TurnRecordRow]:
        """Return the instance's turn records, newest first."""
        async with self._store._connection() as conn:
            cursor = await conn.execute(BROKER_QUERIES["turns"], {**_instance_params(instance), "limit": limit})
            rows = await cursor.fetchall()
        return [_turn(instance, row) for row in rows]

    async def prune(self, app: str, /, *, finished_before: datetime, keys_before: datetime) -> Pruned:
        """Delete ``app``'s finished messages and turn records older than the cut-offs, batch by batch.

        Messages done or skipped before ``finished_before`` go with their steps, unless they carry an idempotency
        key and were sent at or after ``keys_before``; turn records go when started before ``finished_before``.
        Pending and failed messages, states and state history are never touched.

        Raises:
            BackendUnavailable: The server cannot be reached; the batches before it stay pruned.
        """
        params = {"app": app, "finished_before": finished_before, "keys_before": keys_before, "limit": PRUNE_BATCH}
        messages = turns = 0
        while True:
            async with self._store._connection() as conn:
                row = await _fetch_one(conn, BROKER_QUERIES["prune"], params)
            assert row is not None  # the statement always returns its one row
            messages, turns = messages + int(row[0]), turns + int(row[1])
            if int(row[0]) < PRUNE_BATCH and int(row[1]) < PRUNE_BATCH:
                return Pruned(messages=messages, turns=turns)

    async def delete_instance(self, instance: InstanceRef, /) -> bool:
        """Delete ``instance`` with its state, state history, messages, steps, turn records and idempotency keys.

        Returns:
            True if the instance existed.

        Raises:
            BackendUnavailable: The server cannot be reached; the instance may or may not have been deleted.
        """
        params = _instance_params(instance)
        async with self._store._connection() as conn, conn.transaction():
            if await _fetch_one(conn, BROKER_QUERIES["lock_instance"], params) is None:
                return False
            row = await _fetch_one(conn, BROKER_QUERIES["delete_instance"], params)
        return row is not None and int(row[0]) > 0


async def _commit_in(conn: psycopg.AsyncConnection[TupleRow], commit: TurnCommit) -> int:
    """Perform one turn commit inside the caller's open transaction; return the new state version.

    Raises:
        LeaseLostError: The claim is stale; the caller's transaction must roll back (nothing of this was written).
    """
    claim = commit.claim
    params = {
        **_turn_params(claim, commit.worker, commit.started_at, commit.duration_s),
        "state": commit.state_json,
        "history_limit": STATE_HISTORY_LIMIT,
    }
    row = await _fenced(conn, claim, BROKER_QUERIES["commit_turn"], params)
    return int(row[0])


async def _fail_in(conn: psycopg.AsyncConnection[TupleRow], failure: TurnFailure) -> None:
    """Record one failed turn inside the caller's open transaction.

    Raises:
        LeaseLostError: The claim is stale; the caller's transaction must roll back (nothing of this was written).
    """
    claim = failure.claim
    params = {**_turn_params(claim, failure.worker, failure.started_at, failure.duration_s), "error": failure.error}
    await _fenced(conn, claim, BROKER_QUERIES["fail_turn"], params)


async def _fenced(
    conn: psycopg.AsyncConnection[TupleRow], claim: Claim, query: LiteralString, params: dict[str, Any]
) -> tuple[Any, ...]:
    """Lock the claim's instance row, then run ``query``, a statement that writes only under a live lease.

    Runs inside the caller's open transaction. Locking first makes sends to this inbox wait, so the statement's
    snapshot (taken after the lock) shows every message sent before it, and its ``clock_timestamp()`` is read
    with the row held.

    Returns:
        The statement's row.

    Raises:
        LeaseLostError: The statement returned no row: the lease was not live, and nothing was written.
    """
    held = await _fetch_one(conn, BROKER_QUERIES["lock_instance"], _instance_params(claim.instance))
    row = await _fetch_one(conn, query, params)
    if row is None:
        raise LeaseLostError(_describe(claim.instance), claim.fencing_token, _lease_problem(claim, held))
    return row


def _lease_problem(claim: Claim, held: tuple[Any, ...] | None) -> str:
    """Say why a fenced write found nothing to write, from the instance row it locked."""
    if held is None:
        return "the instance was deleted"
    token, owner, state_version, first_token = held
    if claim.fencing_token <= first_token:
        return "the instance was deleted (and has started afresh since)"
    if token != claim.fencing_token:
        return f"the instance moved on to fencing token {token}"
    if owner is None:
        return "the lease was released"
    if state_version != claim.state_version:
        return f"the state moved on to version {state_version}"
    return "the lease expired"


def _instance_params(ref: InstanceRef) -> dict[str, Any]:
    return {"app": ref.app, "workflow": ref.workflow, "workflow_id": ref.workflow_id}


def _turn_params(claim: Claim, worker: str, started_at: datetime, duration_s: float) -> dict[str, Any]:
    return {
        **_instance_params(claim.instance),
        "message_id": claim.message_id,
        "fencing_token": claim.fencing_token,
        "version_read": claim.state_version,
        "attempt": claim.attempt,
        "worker": worker,
        "started_at": started_at,
        "duration_s": duration_s,
    }


def _claim(app: str, row: tuple[Any, ...]) -> Claim:
    workflow, workflow_id, token, expires_at, message_id, payload, attempts, state, state_version, names, results = row
    ref = InstanceRef(app, workflow, workflow_id)
    steps = dict(zip(names or (), results or (), strict=True))
    return Claim(
        ref, int(token), _utc(expires_at), message_id, payload, int(attempts), state, int(state_version), steps
    )


def _turn(instance: InstanceRef, row: tuple[Any, ...]) -> TurnRecordRow:
    message_id, worker, attempt, token, version_read, version_written, started_at, duration_s, outcome, error = row
    return TurnRecordRow(
        instance,
        message_id,
        worker,
        int(attempt),
        int(token),
        int(version_read),
        None if version_written is None else int(version_written),
        _utc(started_at),
        float(duration_s),
        outcome,
        error,
    )


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _describe(ref: InstanceRef) -> str:
    return f"{ref.app}:{ref.workflow}/{ref.workflow_id}"

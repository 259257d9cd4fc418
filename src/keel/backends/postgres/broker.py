"""The PostgreSQL broker: inboxes, leases with fencing tokens, the atomic turn commit (G2, G3) and the event log.

Tables (``schema.sql``, steps ``runtime_v1`` to ``runtime_v4``): ``keel_instances`` holds one row per workflow
instance with its lease, fencing token, committed state and its next message, ``(next_visible_at, next_seq)``: the
pending message with the smallest ``(visible_at, seq)`` (NULL when its inbox is empty; a failed message stays next
while it pauses the instance); ``keel_messages`` the inboxes, each message with the seq it was sent under and the
time it becomes visible (``sent_at`` plus the send's ``delay_s``, by the server's clock: a durable timer);
``keel_state_history`` the last states; ``keel_turns`` one record per turn; ``keel_steps`` the step results recorded
per message; ``keel_instance_tombstones`` the last fencing token of each deleted instance; ``keel_events`` each
app's event log, ordered by ``seq``. Statements are in ``broker.sql``; the writes that share a transaction (sends,
events, commits) in ``transactions.py``, which also says in which order a transaction locks several instances.

A lease is live while the instance's ``fencing_token`` is the claim's, ``lease_owner`` is set and
``lease_expires_at`` is after ``clock_timestamp()``. Commit, fail and release clear both; a retry clears the owner
only, leaving ``lease_expires_at`` at the end of the retry delay, which keeps claims (they look at that column
alone) off the instance until then.

How each operation stays atomic and fenced:

- ``send``: one transaction, shared with the other sends of this broker waiting at the same time (group commit,
  ``scripts.py``: one round trip). It locks the instance row (creating it), then appends the message, makes it the
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
  leases and counts the attempts. The first hands the second the rows it locked through a transaction-local setting
  (``keel.claimed``), so both go out together in one script: a claim takes one round trip. A retried message (a
  ``retry_turn`` hold) and a dead letter sent back keep their ``(visible_at, seq)``, so they stay first.
- ``commit_turn``, ``fail_turn``, ``record_step`` and ``retry_turn``: one transaction. It locks the instance row,
  then one statement writes everything under the condition that the lease is live (by the server's clock, read
  after the lock is held); when that condition fails nothing is written and ``LeaseLostError`` says why, from the
  locked row. A commit also locks the inboxes of the messages it sends (in lock order: those that sort before the
  instance's row are locked before it), and after the fenced statement appends them as ``send`` does and its
  events as ``publish`` does, in the same transaction: a refused commit rolls back everything. A commit with a
  NULL state (a handler delivery's acknowledgement) writes no state and keeps the claim's version. A step keeps
  its first result: the insert does nothing on a name already recorded. A refused statement writes nothing, so a
  write with nothing else in its transaction (all but a commit that sends or emits) is one script, committed
  without waiting for its answer, and refused (``LeaseLostError``) after the commit: one round trip.
- Group commit: the step records and the commits that neither send nor emit, waiting at the same time, share one
  transaction (``keel.backends.batch``, ``transactions.script_group``): one statement locks all their instance rows
  in lock order, then each one's fenced statement goes out; a refused one writes nothing and takes nothing of the
  others with it, and each caller is answered (or refused) after the shared commit. Sends are grouped the same way
  (``transactions.script_sends``), each append refused (an idempotency conflict) on its own.
- ``publish``: one transaction. One statement appends the event unless the log holds its id or (in its app) its
  idempotency key; a concurrent append of either makes it wait for that transaction to end, then do nothing. An
  appended event's deliveries are sent as ``send`` sends them; otherwise a second statement finds the event that
  stands for it (or, if that event was pruned meanwhile, it tries again). Every appended message with no delay
  notifies its app's channel at commit, naming its workflow (``wake.py``).
- ``resolve_dead_letter``: one transaction. It locks the instance row (so sends, claims and other resolves of it
  wait), then one statement finds the failed message at ``next_seq`` of the paused instance, makes it pending
  again (attempts 0) or skipped, recomputes the instance's next message, un-pauses the instance and notifies
  the app's channel; it finds nothing, and changes nothing, when the instance is not paused by a failed message.
- ``delete_instance``: one transaction. It locks the instance row (so sends, claims and fenced writes of it wait),
  then one statement deletes the instance, its messages (their steps by cascade), state history and turn records
  and records its fencing token in a tombstone. A fenced write waiting on the row then finds no row and raises
  ``LeaseLostError`` ("the instance was deleted"); a later send starts the instance afresh at state version 0.
- ``prune``: batches of ``PRUNE_BATCH`` messages, turn records and events, each batch one statement (its own
  transaction), repeated until a batch finds less than a full one, so one call prunes everything that is due. Only
  done or skipped messages are deleted, which nothing ever changes again, and rows another pruner holds are
  skipped. A handler delivery's instance goes with its last message, whole and without a tombstone.
- ``renew``, ``release``: one fenced statement each; ``renew`` locks its rows in lock order before it writes.
- ``wait_for_end``: the first read of the status is one statement that also marks the message as waited for
  (``keel_messages.waited``), in a transaction committed without waiting for the disk (the mark is not data: a
  crash loses it with the listener's connection, and every wait marks again after the reconnect); so is the first
  read after each (re)LISTEN of the listener (``EndWaiters.recheck``). The commit, dead letter or skip that ends a
  marked message NOTIFYs its app's end channel in its own transaction; unmarked ones notify nobody, because a NOTIFY
  makes a commit hold a database-wide lock until it has committed, which would line up every commit behind the one
  before. Marking and ending both update the message's row, so one waits for the other: either the end sees the
  mark (and notifies), or the mark's statement returns the ended row. The other reads (after a NOTIFY was heard,
  or the safety re-read) are plain ``message`` reads: the mark is never cleared, so it still stands, and writing
  it again would only leave another dead tuple and more WAL per wait.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from keel.backends.base import InstanceKind, InstanceRef, Pruned, StepRecord, TurnCommit, TurnOutcome
from keel.backends.batch import Batcher
from keel.backends.ends import EndWaiters
from keel.backends.postgres.connection import fetch_one
from keel.backends.postgres.rows import claim as claim_from_row
from keel.backends.postgres.rows import dead_letter, event_row, message_info, stored_record, turn_record
from keel.backends.postgres.scripts import Script
from keel.backends.postgres.transactions import (
    BROKER_QUERIES,
    channel_for,
    commit_in,
    end_channel_for,
    fenced_row,
    held_rows,
    instance_params,
    publish_in,
    script_fenced,
    script_group,
    script_sends,
    send_in,
    standing_id,
    turn_params,
)
from keel.backends.postgres.wake import PostgresListener
from keel.backends.wake import WakeGate
from keel.errors import BackendUnavailable, IdempotencyConflictError, LeaseLostError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection, Sequence
    from datetime import datetime

    import psycopg
    from psycopg.rows import TupleRow

    from keel.backends.base import (
        Claim,
        DeadLetter,
        EventRow,
        MessageInfo,
        NewEvent,
        NewMessage,
        StoredRecord,
        TurnFailure,
        TurnRecordRow,
    )
    from keel.backends.postgres.connection import PostgresConnection

#: How many messages, turn records and events one statement of ``prune`` deletes at most; it repeats until done.
PRUNE_BATCH = 1000

#: How often a wait for a message's end reads its status again when no NOTIFY came. NOTIFY is not lost while the
#: listener is connected, and each reconnect makes every wait read again, so this is only a net for what nothing
#: announces: a commit by a process of an older keel, or a listener that cannot connect while the pool can.
END_RECHECK_S = 5.0

#: How many times ``publish`` looks again for the event in its way when that event is pruned meanwhile.
_PUBLISH_ATTEMPTS = 3


class PostgresBroker:
    """Inboxes, leases and turn commits in the tables of one PostgreSQL schema, over the engine's pool."""

    def __init__(self, connection: PostgresConnection, schema: str) -> None:
        self._connection = connection
        self._schema = schema
        self._gate = WakeGate(connection.url)
        self.ends = EndWaiters(connection.url, recheck_s=END_RECHECK_S)
        self.listener = PostgresListener(connection, schema, self._gate, self.ends)
        #: Commits without sends or events and step records, written together when they wait at the same time.
        self._grouped: Batcher[TurnCommit | StepRecord, int] = Batcher(self._write_group)
        #: Sends of this process's concurrent callers, written together the same way.
        self._sends: Batcher[NewMessage, str] = Batcher(self._write_sends)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[psycopg.AsyncConnection[TupleRow]]:
        """Lend a pooled connection inside one transaction, in pipeline mode.

        For the writes that read an answer before they go on (a commit that sends or emits, ``send_many``,
        ``publish``, ``delete_instance``, ``resolve_dead_letter``); the others are scripts (``_run``), one round
        trip each. Statements go out as they are queued and their results are read only when needed, so a write
        waits for the server only when it needs an answer to go on, and once more for its COMMIT. The transaction
        is opened and closed with plain statements, because psycopg's transaction blocks wait for the server as they
        start and as they end in pipeline mode. When the block raises (``LeaseLostError``, a failed statement), the
        pool's connection block rolls back.
        """
        async with self._connection.connection() as conn, conn.pipeline():
            await conn.execute(BROKER_QUERIES["begin"])
            yield conn
            await conn.execute(BROKER_QUERIES["commit"])

    async def _run(self, script: Script) -> list[list[tuple[Any, ...]] | None]:
        """Run ``script`` on a pooled connection: one transaction, one round trip (``scripts.py``)."""
        async with self._connection.connection() as conn:
            return await script.run(conn)

    async def send(self, message: NewMessage, /) -> str:
        """Append ``message`` to its inbox and wake the app's listeners, unless its id or idempotency key was used.

        Written with the other sends of this broker waiting at the same time, in one transaction (group commit):
        each is answered once that transaction has committed, and a conflict of one refuses that one alone.

        Returns:
            The message's id, or the id of the message first sent under the same idempotency key.

        Raises:
            IdempotencyConflictError: The key was used for the instance with another payload; nothing was written.
            BackendUnavailable: The server cannot be reached; the message may or may not have been appended.
        """
        return await self._sends.submit(message)

    async def _write_sends(self, messages: Sequence[NewMessage]) -> list[str | BaseException]:
        """Append messages in one transaction, each deduplicated on its own; each one's id, or its conflict.

        Every append is its own statement and an idempotency conflict is an answer, not an error, so a conflict of
        one writes nothing of it and leaves the others be. A statement that fails outright aborts the transaction:
        then each message goes again alone, so that only the one at fault gets the error.
        """
        script = Script()
        appended = script_sends(script, self._schema, messages)
        try:
            results = await self._run(script)
        except (BackendUnavailable, asyncio.CancelledError):
            raise
        except Exception:
            if len(messages) == 1:
                raise
            return [outcome for message in messages for outcome in await self._write_sends([message])]
        outcomes: list[str | BaseException] = []
        for message, index in zip(messages, appended, strict=True):
            [row] = results[index] or [()]  # the statement always returns its one row
            try:
                outcomes.append(standing_id(message, row))
            except IdempotencyConflictError as exc:
                outcomes.append(exc)
        return outcomes

    async def send_many(self, messages: Sequence[NewMessage], /) -> list[str]:
        """Append each message as ``send`` does, in order, in one transaction: all of them, or none.

        Raises:
            IdempotencyConflictError: A key was used for its instance with another payload, before or earlier in the
                batch; the transaction rolled back, so nothing was written.
            BackendUnavailable: The server cannot be reached; the batch may or may not have been appended, whole.
        """
        if not messages:
            return []
        async with self._transaction() as conn:
            return await send_in(conn, self._schema, messages)

    async def publish(self, event: NewEvent, /) -> str:
        """Append ``event`` to its app's log and send its deliveries, unless its id or idempotency key was used.

        Returns:
            The event's id, or the id of the event first published under the same idempotency key.

        Raises:
            IdempotencyConflictError: The key was used by an event of another type or payload; nothing was written.
            BackendUnavailable: The server cannot be reached; the event may or may not have been appended.
        """
        params = {"app": event.app, "event_id": event.event_id, "idempotency_key": event.idempotency_key}
        async with self._transaction() as conn:
            for _ in range(_PUBLISH_ATTEMPTS):
                if await publish_in(conn, self._schema, [event]):
                    return event.event_id
                # A fresh statement, hence a fresh snapshot: it sees the event whose append this one waited for.
                row = await fetch_one(conn, BROKER_QUERIES["logged_event"], params)
                if row is not None:
                    return _standing_event(event, row)
        # Pruned under our feet each time: what stood in the way has left the log, as this event would have.
        return event.event_id

    async def events(self, app: str, /, *, limit: int) -> list[EventRow]:
        """Return the app's last ``limit`` events, newest first."""
        async with self._connection.connection() as conn:
            cursor = await conn.execute(BROKER_QUERIES["events"], {"app": app, "limit": max(limit, 0)})
            rows = await cursor.fetchall()
        return [event_row(app, row) for row in rows]

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """Lease up to ``limit`` claimable instances of ``app`` in ``workflows``, earliest visible message first.

        The gate notes the workflows and the moment: the next ``wait_for_work`` for ``app`` wakes for them only,
        and at once if one was sent meanwhile.
        """
        self._gate.claiming(app, workflows)
        if limit <= 0 or not workflows:
            return []
        script = Script()
        script.add("lock_ready", {"app": app, "workflows": list(workflows), "limit": limit})
        leased = script.add("lease", {"app": app, "worker": worker, "lease_s": float(lease_s)})
        rows = (await self._run(script))[leased] or []
        return [claim_from_row(app, row) for row in rows]

    async def renew(self, claims: Sequence[Claim], /, *, lease_s: float) -> list[bool]:
        """Extend each lease still live under its claim's token, by ``lease_s`` from the server's now."""
        if not claims:
            return []
        # In lock order (see transactions.py): a commit of one of these instances may be locking others of them.
        ordered = sorted(claims, key=lambda c: (c.instance.app, c.instance.workflow, c.instance.workflow_id))
        params = {
            "apps": [c.instance.app for c in ordered],
            "workflows": [c.instance.workflow for c in ordered],
            "workflow_ids": [c.instance.workflow_id for c in ordered],
            "tokens": [c.fencing_token for c in ordered],
            "lease_s": lease_s,
        }
        async with self._connection.connection() as conn:
            cursor = await conn.execute(BROKER_QUERIES["renew"], params)
            renewed = {InstanceRef(*row) for row in await cursor.fetchall()}
        return [c.instance in renewed for c in claims]

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        """Commit a turn atomically (state, completion, record, sends, events) and release its lease.

        Returns:
            The new state version (the claim's own when ``state_json`` is None).

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease expired; nothing was written.
            BackendUnavailable: The server cannot be reached; the commit may or may not have happened.
        """
        if not (commit.sends or commit.events):
            return int(await self._grouped.submit(commit))
        async with self._transaction() as conn:
            written = await commit_in(conn, self._schema, commit)
        return int((await written.row())[0])

    async def _write_group(self, writes: Sequence[TurnCommit | StepRecord]) -> list[int | BaseException]:
        """Write fenced single-statement writes in one transaction; each one's state version, or why it was refused.

        A statement that fails outright (rather than being refused by its fence) aborts the transaction: then each
        write goes again alone, so that only the one at fault gets its error.
        """
        script = Script()
        locked, fenced = script_group(script, self._schema, writes)
        try:
            results = await self._run(script)
        except (BackendUnavailable, asyncio.CancelledError):
            raise
        except Exception:
            if len(writes) == 1:
                raise
            return [outcome for write in writes for outcome in await self._write_group([write])]
        held = held_rows(results[locked])
        outcomes: list[int | BaseException] = []
        for write, index in zip(writes, fenced, strict=True):
            try:
                row = fenced_row(write.claim, results[index], held.get(write.claim.instance))
            except LeaseLostError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(0 if isinstance(write, StepRecord) else int(row[0]))
        return outcomes

    async def fail_turn(self, failure: TurnFailure, /) -> None:
        """Mark the message failed, pause the instance, record the turn and release the lease, atomically.

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease expired; nothing was written.
            BackendUnavailable: The server cannot be reached.
        """
        params = {
            **turn_params(failure, TurnOutcome.failed),
            "error": failure.error,
            "end_channel": end_channel_for(self._schema, failure.claim.instance.app),
        }
        await self._fenced(failure.claim, "fail_turn", params)

    async def release(self, claim: Claim, /) -> None:
        """Give the lease back if the claim's token is still current; otherwise do nothing."""
        params = {**instance_params(claim.instance), "fencing_token": claim.fencing_token}
        async with self._connection.connection() as conn:
            await conn.execute(BROKER_QUERIES["release"], params)

    async def record_step(self, step: StepRecord, /) -> None:
        """Durably record a step's result for the claim's message; a name already recorded keeps its first result.

        Written with the other fenced writes of this broker waiting at the same time, in one transaction (group
        commit), fenced on its own.

        Raises:
            LeaseLostError: The lease is no longer live (moved on, expired or released); nothing was written.
            BackendUnavailable: The server cannot be reached; the step may or may not have been recorded.
        """
        await self._grouped.submit(step)

    async def retry_turn(self, failure: TurnFailure, /, *, delay_s: float) -> None:
        """Record a failed attempt and release the lease, holding the instance for ``delay_s``, atomically.

        Raises:
            LeaseLostError: The lease is no longer live (moved on, expired or released); nothing was written.
            BackendUnavailable: The server cannot be reached; the retry may or may not have been recorded.
        """
        params = {
            **turn_params(failure, TurnOutcome.retry),
            "error": failure.error,
            "delay_s": float(delay_s),
        }
        await self._fenced(failure.claim, "retry_turn", params)

    async def _fenced(self, claim: Claim, name: str, params: dict[str, Any]) -> tuple[Any, ...]:
        """Run fenced statement ``name`` after locking the claim's instance row: one transaction, one round trip.

        Raises:
            LeaseLostError: The lease was not live; nothing was written.
        """
        script = Script()
        locked, written = script_fenced(script, claim, name, params)
        results = await self._run(script)
        held = results[locked]
        return fenced_row(claim, results[written], held[0] if held else None)

    async def dead_letters(self, app: str, /, *, limit: int) -> list[DeadLetter]:
        """Return the app's dead-lettered messages (status failed), newest failure first."""
        async with self._connection.connection() as conn:
            cursor = await conn.execute(BROKER_QUERIES["dead_letters"], {"app": app, "limit": max(limit, 0)})
            rows = await cursor.fetchall()
        return [dead_letter(app, row) for row in rows]

    async def resolve_dead_letter(self, instance: InstanceRef, /, *, skip: bool) -> str | None:
        """Retry (``skip=False``) or skip the failed message pausing ``instance``, and un-pause it, atomically.

        Returns:
            The dead message's id, or None (nothing changed) if the instance is unknown or not paused by one.

        Raises:
            BackendUnavailable: The server cannot be reached; the instance may or may not have been resolved.
        """
        params = {
            **instance_params(instance),
            "skip": skip,
            "channel": channel_for(self._schema, instance.app),
            "end_channel": end_channel_for(self._schema, instance.app),
        }
        async with self._transaction() as conn:
            if await fetch_one(conn, BROKER_QUERIES["lock_instance"], params) is None:
                return None
            row = await fetch_one(conn, BROKER_QUERIES["resolve_dead_letter"], params)
        return None if row is None else str(row[0])

    async def message(self, app: str, message_id: str, /) -> MessageInfo | None:
        """Return a message's status, or None if no such message was sent to ``app``."""
        async with self._connection.connection() as conn:
            row = await fetch_one(conn, BROKER_QUERIES["message"], {"app": app, "message_id": message_id})
        return None if row is None else message_info(app, message_id, row)

    async def wait_for_end(self, app: str, message_id: str, /, *, timeout_s: float) -> MessageInfo | None:
        """Return the message's status once it has ended, or at ``timeout_s`` (see ``base.Reader.wait_for_end``).

        The first read, and the first after each (re)LISTEN, marks the message as waited for (``mark_waited``), so
        that the write that ends it NOTIFYs its app's end channel, which the listener connection LISTENs on; the
        others only read. No pooled connection is held while parked.
        """
        return await self.ends.wait(
            app,
            message_id,
            timeout_s=timeout_s,
            listen=lambda: self.listener.watch_ends(app),
            check=lambda mark: self._mark_waited(app, message_id) if mark else self.message(app, message_id),
        )

    async def _mark_waited(self, app: str, message_id: str) -> MessageInfo | None:
        """Mark the message as waited for and read its status, in one round trip."""
        async with self._transaction() as conn:
            await conn.execute(BROKER_QUERIES["async_commit"])
            marked = await conn.execute(BROKER_QUERIES["mark_waited"], {"app": app, "message_id": message_id})
        row = await marked.fetchone()  # came back with the COMMIT
        return None if row is None else message_info(app, message_id, row)

    async def state(self, instance: InstanceRef, /) -> StoredRecord | None:
        """Return the instance's committed state, or None before its first committed turn."""
        async with self._connection.connection() as conn:
            row = await fetch_one(conn, BROKER_QUERIES["state"], instance_params(instance))
        return None if row is None else stored_record(f"{instance.workflow}/{instance.workflow_id}", row)

    async def turns(self, instance: InstanceRef, /, *, limit: int) -> list[TurnRecordRow]:
        """Return the instance's turn records, newest first."""
        async with self._connection.connection() as conn:
            cursor = await conn.execute(BROKER_QUERIES["turns"], {**instance_params(instance), "limit": limit})
            rows = await cursor.fetchall()
        return [turn_record(instance, row) for row in rows]

    async def wait_for_work(self, app: str, /, *, timeout_s: float) -> None:
        """Return when a workflow of ``app`` this backend claims may have work, or after ``timeout_s``.

        Raises:
            BackendUnavailable: The listener connection cannot be opened, or the backend is closed.
        """
        await self._gate.wait(app, timeout_s=timeout_s, listen=lambda: self.listener.watch(app))

    async def aclose(self) -> None:
        """Let the waiters go and close the listener connection (the pool is the store's). Safe to call twice."""
        self._gate.close()
        self.ends.close()
        await self.listener.aclose()

    async def prune(self, app: str, /, *, finished_before: datetime, keys_before: datetime) -> Pruned:
        """Delete ``app``'s finished messages, turn records and events older than the cut-offs, batch by batch.

        Messages done or skipped before ``finished_before`` go with their steps, unless they carry an idempotency
        key and were sent at or after ``keys_before``; turn records go when started before ``finished_before``;
        events when published before ``finished_before``, unless they carry an idempotency key and were published
        at or after ``keys_before``. A handler delivery's instance goes whole with its last message. Pending and
        failed messages, the instances of workflows, their states and state history are never touched.

        Raises:
            BackendUnavailable: The server cannot be reached; the batches before it stay pruned.
        """
        params = {
            "app": app,
            "finished_before": finished_before,
            "keys_before": keys_before,
            "limit": PRUNE_BATCH,
            "delivery_kind": InstanceKind.delivery.value,
        }
        totals = [0, 0, 0]
        while True:
            async with self._connection.connection() as conn:
                row = await fetch_one(conn, BROKER_QUERIES["prune"], params)
            assert row is not None  # the statement always returns its one row
            counts = [int(count) for count in row]
            totals = [total + count for total, count in zip(totals, counts, strict=True)]
            if all(count < PRUNE_BATCH for count in counts):
                messages, turns, events = totals
                return Pruned(messages=messages, turns=turns, events=events)

    async def delete_instance(self, instance: InstanceRef, /) -> bool:
        """Delete ``instance`` with its state, state history, messages, steps, turn records and idempotency keys.

        Returns:
            True if the instance existed.

        Raises:
            BackendUnavailable: The server cannot be reached; the instance may or may not have been deleted.
        """
        params = instance_params(instance)
        async with self._transaction() as conn:
            if await fetch_one(conn, BROKER_QUERIES["lock_instance"], params) is None:
                return False
            row = await fetch_one(conn, BROKER_QUERIES["delete_instance"], params)
        return row is not None and int(row[0]) > 0


def _standing_event(event: NewEvent, row: tuple[Any, ...]) -> str:
    """The id ``logged_event`` found for ``event``; raise if it holds ``event``'s key with another type or payload."""
    first_id = str(row[0])
    if first_id != event.event_id and (row[1], row[2]) != (event.type, event.payload_json):
        raise IdempotencyConflictError.of_event(event, first_id)
    return first_id

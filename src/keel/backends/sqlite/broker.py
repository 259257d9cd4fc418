"""The SQLite broker: inboxes, leases with fencing tokens and the atomic turn commit, in the store's own file.

How it works:

- Tables (``schema.sql``, sections ``runtime_v2`` to ``runtime_v7``): ``keel_instances`` holds each instance's
  ``kind`` (workflow or delivery, from the message that created it), lease, fencing token, paused flag, committed
  state and ``next_seq`` / ``next_visible_us``, the seq and visible time of its next message; ``keel_messages`` is
  every inbox, with one ``seq`` for the whole file, each message's ``visible_us`` (sent time plus its delay), status
  (pending, done, failed = dead-lettered, skipped) and attempts; ``keel_steps`` keeps the step results recorded for
  a message, replayed to its later claims; ``keel_state_history`` and ``keel_turns`` keep past states and turn
  records; ``keel_events`` is each app's event log (``seq`` from one autoincrement for the whole file), whose
  idempotency keys are a column with a partial unique index.
- Events: a publish, or a commit's event, is one insert into ``keel_events`` (nothing if its id or key is there
  already) plus one ordinary send per handler delivery, to instance ``on/HANDLER`` / ``EVENT_ID``; a commit's sends
  and events go through the very ``send_in`` and ``publish_in`` that ``send`` and ``publish`` use, inside the
  commit's transaction after its fence check.
- Order and durable timers: an instance's next message is its pending one with the smallest (``visible_us``,
  ``seq``); a claim takes only instances whose ``next_visible_us`` has come, in (``next_visible_us``,
  ``next_seq``) order, from one index range per workflow it asks for (so the ready instances of the others, however
  many, cost it nothing), merged. A send moves ``next_*`` to the new message only if it becomes visible first; a
  commit, failure or resolved dead letter recomputes them. A retried message or a retried dead letter
  keeps its (``visible_us``, ``seq``), so it stays first.
- Every write is one plain function of ``transactions`` run on the database thread inside one ``BEGIN
  IMMEDIATE`` transaction (``SqliteDatabase.write``), so the file's write lock is taken before anything is read:
  claimers in several processes take turns and never lease one instance twice, and nothing is awaited while
  the lock is held. Writes of this process waiting at the same time share one transaction and one sync to disk
  (``writes``, group commit), each still all or nothing. A claim first reads whether any instance is ready
  (``transactions.nothing_ready``) and takes the write lock only if one is: an idle worker's empty claims never
  make other processes' writers wait.
- Clock: SQLite has no server, so lease times come from this machine's clock, which every process sharing the
  file shares. It is read inside the transaction, after the lock was taken, and stored as integer microseconds
  since the epoch so that SQL compares it exactly.
- Fence: a commit, failure, retry or step record first checks that the claim's token is the instance's and its
  lease neither released nor expired (a commit then also compare-and-swaps the state on the version the turn
  read); any refusal raises ``LeaseLostError`` and the transaction rolls back, so nothing is written.
  ``transactions.commit_in`` does one commit inside a transaction opened by its caller, so that the turn's sends
  and events share it (and several commits could one day).
- Retries: a retried attempt releases the lease (no owner) but leaves its expiry at the end of the delay, which
  is exactly what keeps claims away until then; the message stays pending and first in its instance's line.
- Wake-ups: a send, a publish, a commit that sends or emits, a resolved dead letter, a released lease or a retry
  without delay wakes this object's idle waiters at once and, once committed, rings the doorbells of the other
  processes (and connections) on the file (``wake``: a Unix datagram socket per waiting backend). Waiters also
  poll the app's newest seq every ``POLL_INTERVAL_S``, which finds a delayed message coming due (a next message
  whose visible time came after this object's last claim) and anything a lost wake-up would have announced.
- Ends: a commit, a dead letter and a skipped dead letter wake the waits for that message's end
  (``wait_for_end``) of every backend of this process on the file at once and, once committed, ring the ends
  doorbells of the other processes waiting for one (``wake``); those waits read the status again every
  ``END_RECHECK_S`` too, for a lost datagram.
- Pruning runs in batches of ``PRUNE_BATCH`` rows, each its own short transaction, until nothing is left, so a
  big backlog never holds the write lock for long; one ``prune`` call still removes everything due. A handler
  delivery's instance goes whole with its message, row and all (no tombstone: its id is never reused).
- Deleting an instance removes its messages (idempotency keys are their columns), steps, past states and turn
  records in one transaction and leaves its row as a tombstone (``deleted = 1``) keeping its fencing token: a
  claim still held is refused ("the instance was deleted"), and if the instance is sent a message again its
  tokens go on from there, so none is ever handed out twice for it. A tombstone is a few dozen bytes per
  deleted instance id, and is reused when the id comes back.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from keel.backends.base import Pruned
from keel.backends.ends import EndWaiters
from keel.backends.sqlite import transactions as tx
from keel.backends.sqlite.rows import (
    dead_letter,
    event_row,
    message_info,
    micros,
    stored_record,
    to_micros,
    turn_record,
)
from keel.backends.sqlite.transactions import QUERIES
from keel.backends.sqlite.wake import SqliteWake
from keel.backends.wake import WakeGate

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence
    from datetime import datetime

    from keel.backends.base import (
        Claim,
        DeadLetter,
        EventRow,
        InstanceRef,
        MessageInfo,
        NewEvent,
        NewMessage,
        StepRecord,
        StoredRecord,
        TurnCommit,
        TurnFailure,
        TurnRecordRow,
    )
    from keel.backends.sqlite.connection import Database

#: How often an idle worker looks in the file for work no wake-up announced: a delayed message coming due, or a
#: send whose wake-up was lost (or could not be sent: see ``wake``). Each look is one indexed read on the database
#: thread (about 0.1 ms), so 20 ms costs an idle worker well under 1% of a core.
POLL_INTERVAL_S = 0.02

#: How often a wait for a message's end reads its status again although no datagram came: a datagram may be lost,
#: or sent by an older keel that rings nothing for ends. One indexed read per wait.
END_RECHECK_S = 1.0

#: The most messages (and, separately, turn records) one pruning transaction deletes; ``prune`` repeats batches
#: until one comes back short, letting other writers in between.
PRUNE_BATCH = 500


class SqliteBroker:
    """The broker of one SQLite file, over the connection and thread it shares with the store."""

    def __init__(self, database: Database) -> None:
        self.database = database
        # Backends of this process on the same file (or in-memory database) wake each other through their gates.
        self._gate = WakeGate(database.url, neighbours=database.url)
        self.ends = EndWaiters(database.url, recheck_s=END_RECHECK_S, neighbours=database.url)
        self._bell = SqliteWake(database, self._gate, self.ends)

    async def send(self, message: NewMessage, /) -> str:
        """Append ``message`` to its instance's inbox, or return the first id sent under its idempotency key.

        Sending a message id that was sent before appends nothing either and returns that id.

        Raises:
            IdempotencyConflictError: The key was used for the instance with another payload; nothing was written.
        """
        app = message.instance.app
        message_id = await self.database.write(
            lambda conn: tx.send_in(conn, message), after_commit=self._bell.ring(app)
        )
        self._gate.announce(app)
        return message_id

    async def send_many(self, messages: Sequence[NewMessage], /) -> list[str]:
        """Append each message as ``send`` does, in order, in one write transaction: all of them, or none.

        Raises:
            IdempotencyConflictError: A key was used for its instance with another payload, before or earlier in the
                batch; the transaction rolled back, so nothing was written.
        """
        if not messages:
            return []
        apps = tuple(dict.fromkeys(message.instance.app for message in messages))
        message_ids = await self.database.write(
            lambda conn: [tx.send_in(conn, message) for message in messages], after_commit=self._bell.ring(*apps)
        )
        for app in apps:
            self._gate.announce(app)
        return message_ids

    async def publish(self, event: NewEvent, /) -> str:
        """Append ``event`` to its app's log and send its deliveries, atomically; or return the first event's id.

        An event whose id is in the log already, or whose idempotency key an event still in the log was published
        under with the same type and payload, appends nothing, deliveries included.

        Raises:
            IdempotencyConflictError: The key was used by an event of another type or payload; nothing was written.
        """
        event_id = await self.database.write(
            lambda conn: tx.publish_in(conn, event), after_commit=self._bell.ring(event.app)
        )
        self._gate.announce(event.app)
        return event_id

    async def events(self, app: str, /, *, limit: int) -> list[EventRow]:
        """Return the app's last ``limit`` events, newest first."""
        if limit <= 0:
            return []
        params = {"app": app, "limit": limit}
        rows = await self.database.run(lambda conn: conn.execute(QUERIES["events"], params).fetchall())
        return [event_row(app, row) for row in rows]

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """Lease up to ``limit`` claimable instances, the first visible next message first."""
        if limit <= 0:
            return []  # SQLite reads a negative LIMIT as "no limit"
        self._gate.claiming(app, workflows)
        names = sorted(set(workflows))
        lease_us = micros(lease_s)
        claims, latest, now = await self.database.write(
            lambda conn: tx.claim_in(conn, app, names, worker, lease_us, limit),
            read_first=lambda conn: tx.nothing_ready(conn, app, names),  # finding nothing takes no write lock
        )
        self._bell.claimed(app, latest if len(claims) < limit else 0, now)
        return claims

    async def renew(self, claims: Sequence[Claim], /, *, lease_s: float) -> list[bool]:
        """Extend each lease still held under its claim's token; an expired lease is not revived."""
        if not claims:
            return []
        lease_us = micros(lease_s)
        return await self.database.write(lambda conn: tx.renew_in(conn, claims, lease_us))

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        """Write the new state, complete the message, record the turn and release the lease, atomically.

        The turn's sends and events (with their deliveries) go out in the same transaction, and wake this object's
        idle waiters; with ``state_json`` None no state is written and the claim's version is returned.

        Raises:
            LeaseLostError: The claim's token is no longer current, or its lease was released or expired; nothing
                was written.
            BackendUnavailable: The file cannot be written.
        """
        apps = {m.instance.app for m in commit.sends} | {e.app for e in commit.events}
        ended = (commit.claim.instance.app, commit.claim.message_id)
        # commit_in runs inside the transaction, so it reads the clock after the write lock was taken.
        version = await self.database.write(
            lambda conn: tx.commit_in(conn, commit), after_commit=self._bell.ring(*apps, ended=ended)
        )
        for app in apps:
            self._gate.announce(app)
        self.ends.announce(ended[0], [ended[1]])
        return version

    async def fail_turn(self, failure: TurnFailure, /) -> None:
        """Mark the message failed, pause the instance, record the turn and release the lease, atomically.

        Raises:
            LeaseLostError: The claim's token is no longer current, or its lease was released or expired; nothing
                was written.
            BackendUnavailable: The file cannot be written.
        """
        ended = (failure.claim.instance.app, failure.claim.message_id)
        await self.database.write(lambda conn: tx.fail_in(conn, failure), after_commit=self._bell.ring(ended=ended))
        self.ends.announce(ended[0], [ended[1]])

    async def release(self, claim: Claim, /) -> None:
        """Give back the lease if the claim's token is still current and the lease not released already.

        Idle waiters are woken, here and in other processes: the instance may be claimed again at once.
        """
        app = claim.instance.app
        await self.database.write(lambda conn: tx.release_in(conn, claim), after_commit=self._bell.ring(app))
        self._gate.announce(app)

    async def record_step(self, step: StepRecord, /) -> None:
        """Durably record a step's result for the claim's message; a name already recorded keeps its first result.

        Raises:
            LeaseLostError: The claim's token is no longer current, or its lease was released or expired;
                nothing was written.
            BackendUnavailable: The file cannot be written.
        """
        await self.database.write(lambda conn: tx.record_step_in(conn, step))

    async def retry_turn(self, failure: TurnFailure, /, *, delay_s: float) -> None:
        """Record the failed attempt and release the lease, holding the instance for ``delay_s``, atomically.

        Raises:
            LeaseLostError: The claim's token is no longer current, or its lease was released or expired;
                nothing was written.
            BackendUnavailable: The file cannot be written.
        """
        delay_us = micros(delay_s)
        app = failure.claim.instance.app
        # A retry without delay may be claimed at once, so it wakes idle waiters as a send does; a delayed one
        # is found by the worker's next look when its hold ends.
        ring = self._bell.ring(app) if delay_us <= 0 else None
        await self.database.write(lambda conn: tx.retry_in(conn, failure, delay_us), after_commit=ring)
        if ring is not None:
            self._gate.announce(app)

    async def dead_letters(self, app: str, /, *, limit: int) -> list[DeadLetter]:
        """Return the app's dead-lettered messages (status failed), newest failure first."""
        if limit <= 0:
            return []
        params = {"app": app, "limit": limit}
        rows = await self.database.run(lambda conn: conn.execute(QUERIES["dead_letters"], params).fetchall())
        return [dead_letter(app, row) for row in rows]

    async def resolve_dead_letter(self, instance: InstanceRef, /, *, skip: bool) -> str | None:
        """Retry (``skip=False``) or skip the dead letter pausing ``instance`` and un-pause it, atomically.

        Returns:
            The dead message's id, or None (nothing changed) if the instance is unknown or not paused.
        """
        message_id = await self.database.write(
            lambda conn: tx.resolve_in(conn, instance, skip=skip),
            after_commit=self._bell.ring_if_found(instance.app, ends=skip),
        )
        if message_id is not None:
            self._gate.announce(instance.app)
            if skip:
                self.ends.announce(instance.app, [message_id])
        return message_id

    async def message(self, app: str, message_id: str, /) -> MessageInfo | None:
        """Return a message's status, or None."""
        params = {"app": app, "message_id": message_id}
        row = await self.database.run(lambda conn: conn.execute(QUERIES["message_info"], params).fetchone())
        return None if row is None else message_info(app, message_id, row)

    async def wait_for_end(self, app: str, message_id: str, /, *, timeout_s: float) -> MessageInfo | None:
        """Return the message's status once it has ended, or at ``timeout_s`` (see ``base.Reader.wait_for_end``).

        A commit, dead letter or skip through a backend of this process on the same database wakes the wait at once
        (``EndWaiters.announce``), one from another process by its datagram (``wake``); the status is read again
        every ``END_RECHECK_S`` in case a datagram was lost.
        """
        loop = asyncio.get_running_loop()
        return await self.ends.wait(
            app,
            message_id,
            timeout_s=timeout_s,
            listen=lambda: self._bell.listen_for_ends(loop),  # bound before the read: a later end rings it
            check=lambda _mark: self.message(app, message_id),  # nothing to mark: every end is announced
        )

    async def state(self, instance: InstanceRef, /) -> StoredRecord | None:
        """Return the instance's committed state, or None before its first committed turn."""
        params = tx.instance_params(instance)
        row = await self.database.run(lambda conn: conn.execute(QUERIES["instance_state"], params).fetchone())
        return None if row is None else stored_record(f"{instance.workflow}/{instance.workflow_id}", row)

    async def turns(self, instance: InstanceRef, /, *, limit: int) -> list[TurnRecordRow]:
        """Return the instance's turn records, newest first."""
        if limit <= 0:
            return []
        params = {**tx.instance_params(instance), "limit": limit}
        rows = await self.database.run(lambda conn: conn.execute(QUERIES["turns"], params).fetchall())
        return [turn_record(instance, row) for row in rows]

    async def wait_for_work(self, app: str, /, *, timeout_s: float) -> None:
        """Return when a message may have been sent to ``app``, or after ``timeout_s`` at the latest.

        A send through this object wakes the wait at once, and so does one from another process or connection on
        this machine (its wake-up datagram; by polling within ``POLL_INTERVAL_S`` if that is lost). A message sent
        after this object's last claim of ``app`` counts, even one sent before the wait began, so a send between an
        empty claim and the wait is never slept through; so does an instance's next message that became visible
        after that claim (a durable timer coming due). Work that exists but is not visible yet, or was visible at
        the last claim (so was leased by others, or held, or of workflows this worker did not ask for), wakes
        nothing by itself: the wait does not spin on it.
        """
        loop = asyncio.get_running_loop()
        # Listening starts before the first poll reads the file, so a send committed after that read rings this
        # socket; the gate's deadline also bounds a poll stuck behind a write that waits for another process's lock.
        try:
            await self._gate.wait(
                app,
                timeout_s=timeout_s,
                listen=lambda: self._bell.listen(loop),
                poll=lambda: self._bell.has_new_work(app),
                poll_interval_s=POLL_INTERVAL_S,
            )
        finally:
            self._bell.returned(app)

    async def prune(self, app: str, /, *, finished_before: datetime, keys_before: datetime) -> Pruned:
        """Delete the app's done and skipped messages (with their steps), turn records and events past the cut-offs.

        A message or event with an idempotency key sent or published at or after ``keys_before`` stays; nothing
        pending or failed, and no state of a workflow instance, is ever deleted. A handler delivery's instance goes
        whole with its message. Runs in transactions of up to ``PRUNE_BATCH`` rows of each kind until none is left,
        so others may write in between; each batch is all or nothing.
        """
        finished_us, keys_us = to_micros(finished_before), to_micros(keys_before)
        messages = turns = events = 0
        while True:
            batch = await self.database.write(lambda conn: tx.prune_in(conn, app, finished_us, keys_us, PRUNE_BATCH))
            messages, turns, events = messages + batch[0], turns + batch[1], events + batch[2]
            if max(batch) < PRUNE_BATCH:
                return Pruned(messages=messages, turns=turns, events=events)

    async def delete_instance(self, instance: InstanceRef, /) -> bool:
        """Delete an instance and everything it owns, atomically; True if it existed.

        A worker still holding its lease gets ``LeaseLostError`` ("the instance was deleted") from its next commit,
        failure, step record or retry, and its renewals fail; a later send starts the instance afresh at version 0.
        """
        return await self.database.write(lambda conn: tx.delete_in(conn, instance))

    async def aclose(self) -> None:
        """Close the shared connection and its thread, and this backend's wake-up sockets. Safe to call twice."""
        self._gate.close()
        self.ends.close()
        try:
            await self.database.aclose()
        finally:
            self._bell.close()  # after the database thread, which rings through it, has stopped

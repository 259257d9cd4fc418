"""The Redis runtime: workflow instances' inboxes, leases with fencing tokens, and the atomic turn commit.

Map of the design:

- Keys: ``keys.py`` names them (the instance's keys share its hash tag ``{app/workflow/workflow_id}``; ready,
  leased and wake keys are per app); ``scripts/runtime_lib.lua`` draws the whole layout.
- Writes: every operation that changes more than one key, or checks a lease before writing, is one Lua
  script (``send``, ``send_many``, ``claim``, ``renew``, ``group``, ``fail``, ``release``, ``retry``, ``resolve``,
  ``delete``, ``publish``; ``prune`` is one script per bounded batch: ``cleanup.py``), so it is atomic and
  one round trip; ``dead_letters`` and ``events`` are read-only scripts, for one consistent snapshot.
- Sends and events: ``send``, ``publish`` and ``commit`` append through the same Lua functions, given units
  of keys and arguments of one shape (``outbox.py``); so a turn's sends, its events and their deliveries
  join the commit's script, after its lease check. An event is a hash in its app's log, indexed by
  sequence number (``events``) and by publish time (for ``prune``); each delivery is an ordinary message to
  instance ``on/HANDLER`` / event id of kind delivery, which ``prune`` deletes whole once its message is pruned.
  The shared helpers of ``runtime_lib.lua`` are prepended to each script's text when it is registered.
- Timers and claiming: an instance's inbox is a sorted set of its pending messages by visible time (send
  time + ``delay_s``, by the server's clock), ties by the app-wide sequence number. A per-(app, workflow)
  sorted set holds the unleased instances with a pending message, scored by their next message's visible
  time; a second one holds leased instances by lease expiry. ``claim.lua`` first moves expired leases back
  to the ready set, then takes the scores that have passed, lowest first (ties by sequence number), across
  the asked workflows, raises each instance's fencing token and leases it. Redis runs one script at a time,
  so two claimers, in any processes, never take the same instance.
- Retries: ``retry.lua`` releases the lease but keeps the instance in the leased set, scored by the end of
  its hold, with no owner; it is in no ready set until a claim after the hold's end sweeps it back, under
  its next message's visible time (that message keeps its place), exactly like an expired lease.
- Group commit: turn commits and step records waiting at the same time go in one ``group.lua`` call (one round
  trip, one sync to disk with ``appendfsync always``: ``keel.backends.batch``), each unit checked against its own
  lease and written or refused on its own; each caller is answered when the script has returned.
- Fencing: commits, step records, ``fail``, ``renew`` and ``retry`` check, inside the script, that the instance
  still exists, the claim's token is still its, its lease not released (owner set) and unexpired by the
  server's clock; otherwise they write nothing and say why, which becomes ``LeaseLostError`` here.
- Deletion: ``delete.lua`` removes the instance's keys, its messages (found in its ``ids:`` set) and its
  entries in the app's sets. The deleted instance's token is kept in the app's ``tokfloor:``, where a new
  instance's token starts: a recreated instance never hands out a token its old incarnation used.
- Steps: a hash per message (``steps:``), written with ``HSETNX`` (the first result stands) and read by the
  claim that leases the message, into ``Claim.steps``.
- Dead letters: ``fail.lua`` adds the message to its app's ``dead:`` set, scored by the failure time;
  ``resolve.lua`` takes it out again, retrying or skipping it, and un-pauses the instance.
- Time: lease expiries and ``written_at`` come from the server's ``TIME``, in microseconds since the epoch.
- Waking: a send (by ``send``, ``publish`` or ``commit``) and ``resolve.lua`` append to the app's wake
  stream; ``wait_for_work`` waits on the backend's wake gate, fed by a pump blocking on that stream
  (``wake.py``). The end of a hold, or a timer coming due, wakes no one: idle workers see it at their next poll.
- Ends: the commit, dead letter or skip that ends a message PUBLISHes its id on the app's ``ended:`` channel
  from its script; ``wait_for_end`` waits on the backend's ``EndWaiters``, fed by one pub/sub connection
  (``ends.py``), and reads the status again after every (re)subscription.
- Errors: every call runs inside the connection's error boundary (``connection.py``), so driver errors become
  ``BackendUnavailable``.

Turn records are JSON (``rows.py``); the newest ``TURNS_LIMIT`` are kept per instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

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
    TurnCommit,
    TurnFailure,
    TurnOutcome,
    TurnRecordRow,
)
from keel.backends.batch import Batcher
from keel.backends.ends import EndWaiters
from keel.backends.redis.cleanup import delete_call, prune_app
from keel.backends.redis.ends import EndSubscriber
from keel.backends.redis.keys import instance_member, parse_instance_member
from keel.backends.redis.lua import runtime_script
from keel.backends.redis.outbox import event_from_row, event_unit, outbox, send_unit
from keel.backends.redis.rows import (
    claim_from_row,
    dead_letter_from_row,
    lease_lost,
    micros,
    micros_since_epoch,
    record_from_fields,
    turn_from_json,
    turn_json,
)
from keel.backends.redis.wake import WakeStreams
from keel.backends.wake import WakeGate
from keel.errors import IdempotencyConflictError

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence
    from datetime import datetime

    from redis.asyncio import Redis

    from keel.backends.redis.connection import RedisConnection

#: Turn records kept per instance, newest first; older ones are trimmed by the commit that pushes a new one.
TURNS_LIMIT = 1000

#: How often a wait for a message's end reads its status again when nothing was published. A subscriber hears
#: every PUBLISH while connected, and each reconnect makes every wait read again, so this is only a net for what
#: nothing announces (a commit by a process of an older keel).
END_RECHECK_S = 5.0

#: About how many entries an app's wake stream keeps (trimmed with ``MAXLEN ~``); waiters need only the last.
WAKE_STREAM_MAXLEN = 100

#: At least this many expired leases per workflow are put back in play by each claim, before it picks.
SWEEP_LIMIT = 100

#: At most this many instances whose next messages share one visible time are read to order them by send.
TIE_LIMIT = 1000

#: The scripts of the runtime, each run with ``runtime_lib.lua`` prepended.
RUNTIME_SCRIPTS = (
    "send.lua",
    "send_many.lua",
    "claim.lua",
    "renew.lua",
    "group.lua",
    "fail.lua",
    "release.lua",
    "retry.lua",
    "dead_letters.lua",
    "resolve.lua",
    "prune.lua",
    "delete.lua",
    "publish.lua",
    "events.lua",
)

_STATE_FIELDS = ("v", "d", "t", "w")


class RedisBroker:
    """Inboxes, leases and turn commits in Redis, shared by every process using the same server, DB and prefix."""

    def __init__(self, connection: RedisConnection, waiting: Redis) -> None:
        """Use ``connection`` for every call but the blocking reads of waits, which use ``waiting``."""
        client = connection.client
        self._client = client
        self._keys = connection.keys
        self._boundary = connection.boundary
        self._gate = WakeGate(connection.url)
        self._waker = WakeStreams(waiting, connection.keys, connection.errors, self._gate)
        self.ends = EndWaiters(connection.url, recheck_s=END_RECHECK_S)
        self._end_subscriber = EndSubscriber(waiting, connection.keys, self.ends)
        scripts = {name: client.register_script(runtime_script(name)) for name in RUNTIME_SCRIPTS}
        self._scripts = scripts
        self._send, self._claim, self._renew = scripts["send.lua"], scripts["claim.lua"], scripts["renew.lua"]
        self._send_many = scripts["send_many.lua"]
        self._group, self._fail, self._release = scripts["group.lua"], scripts["fail.lua"], scripts["release.lua"]
        self._retry = scripts["retry.lua"]
        #: Turn commits and step records, written in one script when they wait at the same time (group commit).
        self._grouped: Batcher[TurnCommit | StepRecord, int] = Batcher(self._write_group)
        self._dead_letters, self._resolve = scripts["dead_letters.lua"], scripts["resolve.lua"]
        self._prune, self._delete = scripts["prune.lua"], scripts["delete.lua"]
        self._publish, self._events = scripts["publish.lua"], scripts["events.lua"]

    async def load_scripts(self) -> None:
        """Load every runtime script now, so that each first call is a single EVALSHA."""
        async with self._boundary("connect"):
            for script in self._scripts.values():
                await self._client.script_load(script.script)

    async def send(self, message: NewMessage, /) -> str:
        """Add ``message`` to its instance's inbox, visible ``delay_s`` from now by the server's clock.

        Sending the same message id again adds nothing, so a send whose reply was lost can be repeated.

        Returns:
            The message's id; the first message's id when the idempotency key was used before for the instance.

        Raises:
            IdempotencyConflictError: The key was used for the instance with another payload; nothing was written.
            BackendUnavailable: The server cannot be reached; the message may or may not have been appended.
        """
        keys, args = send_unit(self._keys, message)
        async with self._boundary("send"):
            sent, conflict = await self._send(keys=keys, args=[*args, WAKE_STREAM_MAXLEN])
        if conflict:
            raise IdempotencyConflictError.of_message(message, str(sent))
        return str(sent)

    async def send_many(self, messages: Sequence[NewMessage], /) -> list[str]:
        """Add each message as ``send`` does, in order, in one script: all of them, or none.

        Raises:
            IdempotencyConflictError: A key was used for its instance with another payload, before or earlier in the
                batch; the script looked for that before writing anything, so nothing was written.
            BackendUnavailable: The server cannot be reached; the batch may or may not have been appended, whole.
        """
        if not messages:
            return []
        keys, args = outbox(self._keys, messages, ())
        async with self._boundary("send"):
            reply = await self._send_many(keys=keys, args=[WAKE_STREAM_MAXLEN, len(messages), *args])
        if int(reply[0]) == 1:
            raise IdempotencyConflictError.of_message(messages[int(reply[1]) - 1], str(reply[2]))
        return [str(message_id) for message_id in reply[1:]]

    async def publish(self, event: NewEvent, /) -> str:
        """Append ``event`` to its app's log and send its deliveries, in one script; wake idle workers.

        Returns:
            The event's id; the first event's id when the idempotency key was used by an event still in the
            app's log, or the event's own when it is in the log already (then nothing is appended).

        Raises:
            IdempotencyConflictError: The key was used by an event of another type or payload; nothing was written.
            BackendUnavailable: The server cannot be reached; the event may or may not have been appended.
        """
        keys, args = event_unit(self._keys, event)
        async with self._boundary("publish"):
            published, conflict = await self._publish(keys=keys, args=[WAKE_STREAM_MAXLEN, *args])
        if conflict:
            raise IdempotencyConflictError.of_event(event, str(published))
        return str(published)

    async def events(self, app: str, /, *, limit: int) -> list[EventRow]:
        """Return up to ``limit`` of the app's logged events, newest first.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        if limit <= 0:
            return []
        async with self._boundary("events"):
            rows = await self._events(keys=[self._keys.events(app)], args=[self._keys.event_stem(app), limit])
        return [event_from_row(app, row) for row in rows]

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """Lease up to ``limit`` instances with a visible pending message, no live lease or hold, not paused.

        Instances go in the order of their next messages' (visible time, sequence number); each claim carries
        the step results recorded for its message by earlier attempts.

        Returns:
            One claim per leased instance, each under a fencing token one higher than the instance's last.

        Raises:
            BackendUnavailable: The server cannot be reached; leases a lost reply took expire by themselves.
        """
        names = sorted(set(workflows))
        if not names or limit <= 0:
            return []
        self._gate.claiming(app, names)
        keys = [key for name in names for key in (self._keys.ready(app, name), self._keys.leased(app, name))]
        args: list[str | int] = [self._keys.prefix, worker, micros(lease_s), limit, max(limit, SWEEP_LIMIT), TIE_LIMIT]
        async with self._boundary("claim"):
            reply = await self._claim(keys=[*keys, self._keys.wake(app)], args=args)
        self._waker.note_claimed(app, str(reply[0]))
        return [claim_from_row(row) for row in reply[1:]]

    async def renew(self, claims: Sequence[Claim], /, *, lease_s: float) -> list[bool]:
        """Extend the leases still held under these claims' tokens; an expired or released lease is not revived.

        Returns:
            For each claim, True if its lease now runs ``lease_s`` from the server's now, False if it was lost.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        if not claims:
            return []
        keys: list[str] = []
        args: list[str | int] = [micros(lease_s)]
        for claim in claims:
            ref, member = claim.instance, instance_member(claim.instance)
            keys += [self._keys.instance(member), self._keys.leased(ref.app, ref.workflow)]
            args += [member, claim.fencing_token]
        async with self._boundary("renew"):
            held = await self._renew(keys=keys, args=args)
        return [bool(flag) for flag in held]

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        """Write the new state, complete the message, record the turn, release the lease, send, emit: one script.

        The turn's sends and events (with their deliveries) are appended as ``send`` and ``publish`` append them,
        and wake the apps they send to. A commit without state (a handler delivery's acknowledgement) writes no
        state and keeps the claim's version.

        Returns:
            The new state version: one above the version the claim read, or that version without state.

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease was released or expired, or
                the state or inbox moved on; nothing written.
            BackendUnavailable: The server cannot be reached; the commit may or may not have been applied.
        """
        return await self._grouped.submit(commit)

    async def fail_turn(self, failure: TurnFailure, /) -> None:
        """Dead-letter the message, pause the instance, record the turn and release the lease, in one script.

        The message's failure time comes from the server's clock; it is listed by ``dead_letters``.

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease was released or expired;
                nothing written.
            BackendUnavailable: The server cannot be reached.
        """
        claim = failure.claim
        ref, member = claim.instance, instance_member(claim.instance)
        keys = [
            self._keys.instance(member),
            self._keys.message(member, claim.message_id),
            self._keys.turns(member),
            self._keys.leased(ref.app, ref.workflow),
            self._keys.dead(ref.app),
            self._keys.turn_index(ref.app),
        ]
        turn = turn_json(failure, version_written=None, outcome=TurnOutcome.failed, error=failure.error)
        args: list[str | int] = [self._keys.prefix, member, claim.fencing_token, claim.message_id, failure.error]
        async with self._boundary("fail"):
            reply = await self._fail(keys=keys, args=[*args, turn, TURNS_LIMIT])
        if int(reply[0]) != 1:
            raise lease_lost(claim, str(reply[1]), str(reply[2]))

    async def release(self, claim: Claim, /) -> None:
        """Give the lease back without running the turn, if the claim's token is still current; else do nothing.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        ref, member = claim.instance, instance_member(claim.instance)
        keys = [
            self._keys.instance(member),
            self._keys.ready(ref.app, ref.workflow),
            self._keys.leased(ref.app, ref.workflow),
        ]
        async with self._boundary("release"):
            await self._release(keys=keys, args=[self._keys.prefix, member, claim.fencing_token])

    async def record_step(self, step: StepRecord, /) -> None:
        """Record a step's result for the claim's message, in one script that checks the lease first.

        A name already recorded for the message keeps its first result; recording it again is no error.

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease was released or expired;
                nothing written.
            BackendUnavailable: The server cannot be reached; the result may or may not have been recorded.
        """
        await self._grouped.submit(step)

    async def retry_turn(self, failure: TurnFailure, /, *, delay_s: float) -> None:
        """Record the failed attempt, release the lease and hold the instance ``delay_s``, in one script.

        The message stays pending and first in its inbox, its attempts counted; the first claim after the
        hold ends (by the server's clock) takes it again, before the instance's later messages.

        Raises:
            LeaseLostError: The claim's token is no longer the instance's, or its lease was released or expired;
                nothing written.
            BackendUnavailable: The server cannot be reached; the retry may or may not have been recorded.
        """
        claim = failure.claim
        ref, member = claim.instance, instance_member(claim.instance)
        keys = [
            self._keys.instance(member),
            self._keys.turns(member),
            self._keys.leased(ref.app, ref.workflow),
            self._keys.turn_index(ref.app),
        ]
        turn = turn_json(failure, version_written=None, outcome=TurnOutcome.retry, error=failure.error)
        args: list[str | int] = [member, claim.fencing_token, micros(delay_s), turn, TURNS_LIMIT]
        async with self._boundary("retry"):
            reply = await self._retry(keys=keys, args=args)
        if int(reply[0]) != 1:
            raise lease_lost(claim, str(reply[1]), str(reply[2]))

    async def dead_letters(self, app: str, /, *, limit: int) -> list[DeadLetter]:
        """Return up to ``limit`` of the app's dead-lettered messages, newest failure first.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        if limit <= 0:
            return []
        keys = [self._keys.dead(app), self._keys.message_index(app)]
        async with self._boundary("dead_letters"):
            rows = await self._dead_letters(keys=keys, args=[self._keys.prefix, limit])
        return [dead_letter_from_row(row) for row in rows]

    async def resolve_dead_letter(self, instance: InstanceRef, /, *, skip: bool) -> str | None:
        """Retry (``skip=False``) or skip the dead message of a paused instance and un-pause it, in one script.

        Returns:
            The dead message's id, or None if the instance is not paused by a dead letter (nothing changed).

        Raises:
            BackendUnavailable: The server cannot be reached; the instance may or may not have been resolved.
        """
        member = instance_member(instance)
        keys = [
            self._keys.instance(member),
            self._keys.inbox(member),
            self._keys.dead(instance.app),
            self._keys.ready(instance.app, instance.workflow),
            self._keys.finished(instance.app),
            self._keys.finished_keyed(instance.app),
            self._keys.wake(instance.app),
        ]
        args: list[str | int] = [self._keys.prefix, member, "1" if skip else "0", WAKE_STREAM_MAXLEN]
        async with self._boundary("resolve"):
            resolved = await self._resolve(keys=keys, args=args)
        return None if resolved is None else str(resolved)

    async def message(self, app: str, message_id: str, /) -> MessageInfo | None:
        """Return the status of a message, or None if no such message was sent to ``app``.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        # decode_responses=True: every reply is text.
        async with self._boundary("message"):
            member = cast("str | None", await self._client.hget(self._keys.message_index(app), message_id))
            if member is None:
                return None
            fields = await self._client.hmget(self._keys.message(member, message_id), ["s", "v", "e"])
        status, version, error = cast("list[str | None]", fields)
        ref = InstanceRef(*parse_instance_member(member))
        return MessageInfo(
            message_id,
            ref,
            MessageStatus(status or MessageStatus.pending),
            None if version is None else int(version),
            error,
        )

    async def wait_for_end(self, app: str, message_id: str, /, *, timeout_s: float) -> MessageInfo | None:
        """Return the message's status once it has ended, or at ``timeout_s`` (see ``base.Reader.wait_for_end``).

        The script that ends a message PUBLISHes its id on the app's ``ended:`` channel, which the backend's one
        pub/sub connection subscribes to (``ends.py``); the reads go through the main pool, held only while reading.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        return await self.ends.wait(
            app,
            message_id,
            timeout_s=timeout_s,
            listen=lambda: self._end_subscriber.watch(app),
            check=lambda _mark: self.message(app, message_id),  # nothing to mark: every end is announced
        )

    async def state(self, instance: InstanceRef, /) -> StoredRecord | None:
        """Return the instance's committed state, or None before its first committed turn.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        async with self._boundary("state"):
            fields = await self._client.hmget(self._keys.instance(instance_member(instance)), _STATE_FIELDS)
        return record_from_fields(f"{instance.workflow}/{instance.workflow_id}", cast("list[str | None]", fields))

    async def turns(self, instance: InstanceRef, /, *, limit: int) -> list[TurnRecordRow]:
        """Return up to ``limit`` of the instance's kept turn records, newest first.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        if limit <= 0:
            return []
        async with self._boundary("turns"):
            entries = await self._client.lrange(self._keys.turns(instance_member(instance)), 0, limit - 1)
        return [turn_from_json(instance, entry) for entry in cast("list[str]", entries)]

    async def aclose(self) -> None:
        """Let the waiters go, stop the wake pumps and close the waiting pool (the main one is the store's)."""
        self._gate.close()
        self.ends.close()
        await self._end_subscriber.aclose()
        await self._waker.aclose()

    async def wait_for_work(self, app: str, /, *, timeout_s: float) -> None:
        """Return when a message may have been sent to ``app``, or after ``timeout_s`` at the latest.

        Raises:
            BackendUnavailable: The server cannot be reached.
        """
        await self._gate.wait(app, timeout_s=timeout_s, listen=lambda: self._waker.watch(app))

    async def prune(self, app: str, /, *, finished_before: datetime, keys_before: datetime) -> Pruned:
        """Delete the app's done and skipped messages and turn records older than the cut-offs.

        A message sent with an idempotency key at or after ``keys_before`` stays. Pending and failed messages,
        state and state history are never touched. Runs bounded batches until nothing due is left (``cleanup.py``).

        Raises:
            BackendUnavailable: The server cannot be reached; the batches done so far stay done.
        """
        async with self._boundary("prune"):
            return await prune_app(
                self._prune,
                self._keys,
                app,
                finished_before_us=micros_since_epoch(finished_before),
                keys_before_us=micros_since_epoch(keys_before),
            )

    async def delete_instance(self, instance: InstanceRef, /) -> bool:
        """Delete the instance and everything it owns, in one script; a worker holding its lease is fenced out.

        Returns:
            True if the instance existed.

        Raises:
            BackendUnavailable: The server cannot be reached; the instance may or may not have been deleted.
        """
        keys, args = delete_call(self._keys, instance)
        async with self._boundary("delete"):
            existed = await self._delete(keys=keys, args=args)
        return bool(existed)

    async def _write_group(self, writes: Sequence[TurnCommit | StepRecord]) -> list[int | BaseException]:
        """Write turn commits and step records in one ``group.lua`` call; each one's version, or why it was refused."""
        keys: list[str] = []
        heads: list[str | int] = []
        args: list[str | int] = []
        for write in writes:
            kind = "step" if isinstance(write, StepRecord) else "commit"
            unit_keys, unit_args = self._step_call(write) if isinstance(write, StepRecord) else self._commit_call(write)
            keys += unit_keys
            heads += [kind, len(unit_keys), len(unit_args)]
            args += unit_args
        async with self._boundary("commit"):
            replies = await self._group(keys=keys, args=[len(writes), *heads, *args])
        outcomes: list[int | BaseException] = []
        for write, reply in zip(writes, replies, strict=True):
            if int(reply[0]) != 1:
                outcomes.append(lease_lost(write.claim, str(reply[1]), str(reply[2])))
            else:
                outcomes.append(0 if isinstance(write, StepRecord) else int(reply[1]))
        return outcomes

    def _step_call(self, step: StepRecord) -> tuple[list[str], list[str | int]]:
        """The keys and arguments of one step record: a unit of ``group.lua``."""
        claim = step.claim
        member = instance_member(claim.instance)
        keys = [self._keys.instance(member), self._keys.steps(member, claim.message_id)]
        return keys, [claim.fencing_token, step.name, step.result_json]

    def _commit_call(self, commit: TurnCommit) -> tuple[list[str], list[str | int]]:
        """The keys and arguments of one turn's commit: a unit of ``group.lua``."""
        claim = commit.claim
        ref, member = claim.instance, instance_member(claim.instance)
        keys = [
            self._keys.instance(member),
            self._keys.inbox(member),
            self._keys.message(member, claim.message_id),
            self._keys.states(member),
            self._keys.turns(member),
            self._keys.ready(ref.app, ref.workflow),
            self._keys.leased(ref.app, ref.workflow),
            self._keys.finished(ref.app),
            self._keys.finished_keyed(ref.app),
            self._keys.turn_index(ref.app),
        ]
        has_state = commit.state_json is not None
        version = claim.state_version + 1 if has_state else claim.state_version
        turn = turn_json(commit, version_written=version, outcome=TurnOutcome.committed, error=None)
        args: list[str | int] = [self._keys.prefix, member, claim.fencing_token, claim.message_id]
        args += [claim.state_version, "1" if has_state else "0", commit.state_json or "", commit.worker, turn]
        args += [STATE_HISTORY_LIMIT, TURNS_LIMIT, WAKE_STREAM_MAXLEN, len(commit.sends), len(commit.events)]
        sent_keys, sent_args = outbox(self._keys, commit.sends, commit.events)
        return [*keys, *sent_keys], [*args, *sent_args]

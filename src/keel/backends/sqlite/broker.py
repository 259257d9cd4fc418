"""The SQLite broker: inboxes, leases with fencing tokens and the atomic turn commit, in the store's own file.

How it works:

- Tables (``schema.sql``, section ``runtime_v2``): ``keel_instances`` holds each workflow instance's lease,
  fencing token, paused flag, committed state and ``next_seq``, the seq of its oldest pending message;
  ``keel_messages`` is every inbox, ordered by one ``seq`` for the whole file; ``keel_state_history`` and
  ``keel_turns`` keep past states and turn records.
- Every write is one plain function run on the database thread inside one ``BEGIN IMMEDIATE`` transaction
  (``SqliteDatabase.write``), so the file's write lock is taken before anything is read: claimers in several
  processes take turns and never lease one instance twice, and nothing is awaited while the lock is held.
- Clock: SQLite has no server, so lease times come from this machine's clock, which every process sharing the
  file shares. It is read inside the transaction, after the lock was taken, and stored as integer microseconds
  since the epoch so that SQL compares it exactly.
- Fence: a commit or failure first checks that the claim's token is the instance's and its lease unexpired, then
  writes the state with a compare-and-swap on the version the turn read; any refusal raises ``LeaseLostError``
  and the transaction rolls back, so nothing is written. ``_commit_in`` does one commit inside a transaction
  opened by its caller, so that several commits, step records and events can later share one transaction.
- Wake-ups: a send through this object wakes its idle waiters at once; sends from other processes or
  connections are seen by polling the app's newest seq every ``POLL_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from keel.backends._sql import load_queries
from keel.backends.base import (
    STATE_HISTORY_LIMIT,
    Claim,
    InstanceRef,
    MessageInfo,
    MessageStatus,
    NewMessage,
    StoredRecord,
    TurnCommit,
    TurnFailure,
    TurnRecordRow,
)
from keel.errors import LeaseLostError

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Collection, Sequence

    from keel.backends.sqlite.database import SqliteDatabase

#: The broker's statements, by name (``runtime.sql``).
QUERIES = load_queries(__package__ or "keel.backends.sqlite", "runtime.sql")

#: How often an idle worker looks in the file for messages sent by other processes. Each look is one indexed
#: read on the database thread (about 0.1 ms), so 20 ms costs an idle worker well under 1% of a core while
#: keeping the send-to-start delay short (SQLite has no way to notify another process).
POLL_INTERVAL_S = 0.02

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_Params = dict[str, Any]


class SqliteBroker:
    """The broker of one SQLite file, over the connection and thread it shares with the store."""

    def __init__(self, database: SqliteDatabase) -> None:
        self.database = database
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        #: Per app, the newest seq the last claim saw; 0 after a claim that filled its limit (work may be left).
        self._seen_seq: dict[str, int] = {}

    async def send(self, message: NewMessage, /) -> str:
        """Append ``message`` to its instance's inbox, or return the first id sent under its idempotency key.

        Sending a message id that was sent before appends nothing either and returns that id.
        """
        message_id = await self.database.write(lambda conn: _send_in(conn, message, _now_us()))
        self._wake(message.instance.app)
        return message_id

    async def claim(
        self, app: str, workflows: Collection[str], /, *, worker: str, lease_s: float, limit: int
    ) -> list[Claim]:
        """Lease up to ``limit`` claimable instances, oldest pending message first."""
        if limit <= 0:
            return []  # SQLite reads a negative LIMIT as "no limit"
        names = json.dumps(sorted(set(workflows)))
        lease_us = _micros(lease_s)
        claims, latest = await self.database.write(lambda conn: _claim_in(conn, app, names, worker, lease_us, limit))
        self._seen_seq[app] = latest if len(claims) < limit else 0
        return claims

    async def renew(self, claims: Sequence[Claim], /, *, lease_s: float) -> list[bool]:
        """Extend each lease still held under its claim's token; an expired lease is not revived."""
        if not claims:
            return []
        lease_us = _micros(lease_s)
        return await self.database.write(lambda conn: _renew_in(conn, claims, lease_us))

    async def commit_turn(self, commit: TurnCommit, /) -> int:
        """Write the new state, complete the message, record the turn and release the lease, atomically.

        Raises:
            LeaseLostError: The claim's token is no longer current or its lease expired; nothing was written.
            BackendUnavailable: The file cannot be written.
        """
        # The lambda runs inside the transaction, so the clock is read after the write lock was taken.
        return await self.database.write(lambda conn: _commit_in(conn, commit, _now_us()))

    async def fail_turn(self, failure: TurnFailure, /) -> None:
        """Mark the message failed, pause the instance, record the turn and release the lease, atomically.

        Raises:
            LeaseLostError: The claim's token is no longer current or its lease expired; nothing was written.
            BackendUnavailable: The file cannot be written.
        """
        await self.database.write(lambda conn: _fail_in(conn, failure, _now_us()))

    async def release(self, claim: Claim, /) -> None:
        """Give back the lease if the claim's token is still current."""
        await self.database.write(lambda conn: _release_in(conn, claim))

    async def message(self, app: str, message_id: str, /) -> MessageInfo | None:
        """Return a message's status, or None."""
        params = {"app": app, "message_id": message_id}
        row = await self.database.run(lambda conn: conn.execute(QUERIES["message_info"], params).fetchone())
        if row is None:
            return None
        workflow, workflow_id, status, version, error = row
        return MessageInfo(message_id, InstanceRef(app, workflow, workflow_id), MessageStatus(status), version, error)

    async def state(self, instance: InstanceRef, /) -> StoredRecord | None:
        """Return the instance's committed state, or None before its first committed turn."""
        params = _instance_params(instance)
        row = await self.database.run(lambda conn: conn.execute(QUERIES["instance_state"], params).fetchone())
        if row is None:
            return None
        version, state, written_at, writer = row
        return StoredRecord(_state_key(instance), int(version), state, datetime.fromisoformat(written_at), writer)

    async def turns(self, instance: InstanceRef, /, *, limit: int) -> list[TurnRecordRow]:
        """Return the instance's turn records, newest first."""
        if limit <= 0:
            return []
        params = {**_instance_params(instance), "limit": limit}
        rows = await self.database.run(lambda conn: conn.execute(QUERIES["turns"], params).fetchall())
        return [_turn_record(instance, row) for row in rows]

    async def wait_for_work(self, app: str, /, *, timeout_s: float) -> None:
        """Return when a message may have been sent to ``app``, or after ``timeout_s`` at the latest.

        A send through this object wakes the wait at once; one from another process or connection within
        ``POLL_INTERVAL_S``. A message sent after this object's last claim of ``app`` counts, even one sent
        before the wait began, so a send between an empty claim and the wait is never slept through.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(app, set()).add(waiter)
        try:
            # The deadline also bounds a poll stuck behind a write that waits for another process's lock.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._wait(app, waiter)
        finally:
            self._waiters.get(app, set()).discard(waiter)
            waiter.cancel()

    async def _wait(self, app: str, waiter: asyncio.Future[None]) -> None:
        seen = self._seen_seq.get(app)
        if seen is None:
            seen = await self._latest_seq(app)
        elif await self._latest_seq(app) > seen:
            return
        while True:
            await asyncio.wait((waiter,), timeout=POLL_INTERVAL_S)
            if waiter.done() or await self._latest_seq(app) > seen:
                return

    async def _latest_seq(self, app: str) -> int:
        row = await self.database.run(lambda conn: conn.execute(QUERIES["latest_seq"], {"app": app}).fetchone())
        return int(row[0])

    def _wake(self, app: str) -> None:
        for waiter in self._waiters.pop(app, set()):
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)


# --- Transactions: each function below runs inside the caller's open BEGIN IMMEDIATE transaction ----------


def _send_in(conn: sqlite3.Connection, message: NewMessage, now_us: int) -> str:
    params = {
        **_instance_params(message.instance),
        "message_id": message.message_id,
        "payload": message.payload_json,
        "idempotency_key": message.idempotency_key,
        "sent_at": _iso(_datetime(now_us)),
    }
    row = conn.execute(QUERIES["insert_message"], params).fetchone()
    if row is None:
        return _first_id(conn, params)
    conn.execute(QUERIES["enqueue"], {**params, "seq": row[0]})
    return message.message_id


def _first_id(conn: sqlite3.Connection, params: _Params) -> str:
    """The id a repeated send returns: the first one sent under its idempotency key, else its own, sent before."""
    if params["idempotency_key"] is not None:
        row = conn.execute(QUERIES["message_by_idempotency_key"], params).fetchone()
        if row is not None:
            return str(row[0])
    return str(params["message_id"])


def _claim_in(
    conn: sqlite3.Connection, app: str, workflows_json: str, worker: str, lease_us: int, limit: int
) -> tuple[list[Claim], int]:
    """Lease the ready instances; also return the app's newest seq, which the next wait starts from."""
    now_us = _now_us()
    params = {"app": app, "workflows": workflows_json, "now_us": now_us, "limit": limit}
    ready = conn.execute(QUERIES["ready_instances"], params).fetchall()
    claims = [
        _lease(conn, InstanceRef(app, workflow, workflow_id), worker, now_us + lease_us)
        for workflow, workflow_id in ready
    ]
    latest = int(conn.execute(QUERIES["latest_seq"], {"app": app}).fetchone()[0])
    return claims, latest


def _lease(conn: sqlite3.Connection, ref: InstanceRef, worker: str, expires_us: int) -> Claim:
    params = {**_instance_params(ref), "worker": worker, "expires_us": expires_us}
    token, seq, state, version = conn.execute(QUERIES["lease_instance"], params).fetchone()
    message_id, payload, attempt = conn.execute(QUERIES["start_attempt"], {"seq": seq}).fetchone()
    return Claim(ref, int(token), _datetime(expires_us), message_id, payload, int(attempt), state, int(version))


def _renew_in(conn: sqlite3.Connection, claims: Sequence[Claim], lease_us: int) -> list[bool]:
    now_us = _now_us()
    times = {"now_us": now_us, "expires_us": now_us + lease_us}
    return [conn.execute(QUERIES["renew_lease"], {**_claim_params(c), **times}).fetchone() is not None for c in claims]


def _release_in(conn: sqlite3.Connection, claim: Claim) -> None:
    conn.execute(QUERIES["release_lease"], _claim_params(claim))


def _commit_in(conn: sqlite3.Connection, commit: TurnCommit, now_us: int) -> int:
    """Commit one turn inside the caller's transaction and return the new state version.

    Raises:
        LeaseLostError: The fence refused the claim; the caller must roll back what was written so far.
    """
    claim = commit.claim
    _check_fence(conn, claim, now_us)
    version = claim.state_version + 1
    written_at = _iso(_datetime(now_us))
    params = {
        **_claim_params(claim),
        "state": commit.state_json,
        "version": version,
        "version_read": claim.state_version,
        "written_at": written_at,
        "completed_at": written_at,
        "writer": commit.worker,
    }
    _finish_message(conn, claim, QUERIES["complete_message"], params)
    if conn.execute(QUERIES["write_state"], params).fetchone() is None:
        raise _lease_lost(claim, f"the state is no longer at version {claim.state_version}")
    conn.execute(QUERIES["append_state_history"], params)
    if version > STATE_HISTORY_LIMIT:
        conn.execute(QUERIES["trim_state_history"], {**params, "oldest_dropped": version - STATE_HISTORY_LIMIT})
    _record_turn(conn, commit, version_written=version, outcome="committed", error=None)
    return version


def _fail_in(conn: sqlite3.Connection, failure: TurnFailure, now_us: int) -> None:
    """Fail one turn inside the caller's transaction: message failed, instance paused, turn recorded."""
    claim = failure.claim
    _check_fence(conn, claim, now_us)
    params = {**_claim_params(claim), "error": failure.error, "completed_at": _iso(_datetime(now_us))}
    _finish_message(conn, claim, QUERIES["fail_message"], params)
    conn.execute(QUERIES["pause_instance"], params)
    _record_turn(conn, failure, version_written=None, outcome="failed", error=failure.error)


def _check_fence(conn: sqlite3.Connection, claim: Claim, now_us: int) -> None:
    row = conn.execute(QUERIES["lease_of"], _instance_params(claim.instance)).fetchone()
    if row is None:
        raise _lease_lost(claim, "the instance does not exist")
    token, expires_us = row
    if token != claim.fencing_token:
        raise _lease_lost(claim, f"the instance moved on to fencing token {token}")
    if expires_us is None:
        raise _lease_lost(claim, "the lease was released")
    if expires_us <= now_us:
        raise _lease_lost(claim, "the lease expired")


def _finish_message(conn: sqlite3.Connection, claim: Claim, query: str, params: _Params) -> None:
    # Under a current lease the claimed message is pending; anything else means someone else settled it.
    if conn.execute(query, params).fetchone() is None:
        raise _lease_lost(claim, f"message {claim.message_id} is no longer pending")


def _record_turn(
    conn: sqlite3.Connection,
    done: TurnCommit | TurnFailure,
    *,
    version_written: int | None,
    outcome: str,
    error: str | None,
) -> None:
    claim = done.claim
    params = {
        **_claim_params(claim),
        "worker": done.worker,
        "attempt": claim.attempt,
        "version_read": claim.state_version,
        "version_written": version_written,
        "started_at": _iso(done.started_at),
        "duration_s": done.duration_s,
        "outcome": outcome,
        "error": error,
    }
    conn.execute(QUERIES["record_turn"], params)


# --- Rows and times ---------------------------------------------------------------------------------------


def _instance_params(ref: InstanceRef) -> _Params:
    return {"app": ref.app, "workflow": ref.workflow, "workflow_id": ref.workflow_id}


def _claim_params(claim: Claim) -> _Params:
    return {**_instance_params(claim.instance), "token": claim.fencing_token, "message_id": claim.message_id}


def _turn_record(instance: InstanceRef, row: tuple[Any, ...]) -> TurnRecordRow:
    message_id, worker, attempt, token, version_read, version_written, started_at, duration_s, outcome, error = row
    return TurnRecordRow(
        instance,
        message_id,
        worker,
        int(attempt),
        int(token),
        int(version_read),
        None if version_written is None else int(version_written),
        datetime.fromisoformat(started_at),
        float(duration_s),
        outcome,
        error,
    )


def _lease_lost(claim: Claim, reason: str) -> LeaseLostError:
    ref = claim.instance
    return LeaseLostError(f"{ref.app}:{ref.workflow}/{ref.workflow_id}", claim.fencing_token, reason)


def _state_key(ref: InstanceRef) -> str:
    return f"{ref.workflow}/{ref.workflow_id}"


def _now_us() -> int:
    """This machine's clock, in microseconds since the epoch: the one clock every process on it shares."""
    return time.time_ns() // 1000


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _datetime(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()

"""The SQLite broker's writes: each function runs inside one ``BEGIN IMMEDIATE`` transaction opened by its caller.

``SqliteBroker`` hands each of them to ``SqliteDatabase.write``, which runs it on the database thread between
``BEGIN IMMEDIATE`` and ``COMMIT`` (``ROLLBACK`` if it raises), so the file's write lock is held from the first
read to the last write and nothing is awaited meanwhile. Lease times are read from this machine's clock inside
the function, after the lock was taken.

The fence (``_check_fence``) refuses a claim whose token is no longer the instance's, whose lease was released
(owner cleared by a commit, failure, release or retry) or whose lease expired; every write made under a claim
(commit, failure, step record, retry) checks it first and raises ``LeaseLostError``, and the caller's
transaction rolls back whatever was written before the refusal.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from keel.backends._sql import load_queries
from keel.backends.base import (
    STATE_HISTORY_LIMIT,
    Claim,
    InstanceKind,
    InstanceRef,
    NewEvent,
    NewMessage,
    StepRecord,
    TurnCommit,
    TurnFailure,
    TurnOutcome,
)
from keel.backends.sqlite.rows import iso, micros, now_us, to_datetime, to_micros
from keel.errors import IdempotencyConflictError, LeaseLostError

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Sequence

#: The broker's statements, by name (``runtime.sql``).
QUERIES = load_queries(__package__ or "keel.backends.sqlite", "runtime.sql")

_Params = dict[str, Any]


# --- Inboxes and leases -------------------------------------------------------------------------------------


def send_in(conn: sqlite3.Connection, message: NewMessage, *, first_wins: bool = False) -> str:
    """Append a message to its instance's inbox; return its id, or the first id sent under its key.

    It becomes visible ``delay_s`` after now (a negative delay counts as none), and becomes the instance's next
    message if it is visible before the one that was next. ``first_wins`` is a turn commit's: its key used before
    with another payload appends nothing and raises nothing (``TurnCommit`` says why).

    Raises:
        IdempotencyConflictError: Without ``first_wins``, the key was used for the instance with another payload;
            nothing was written.
    """
    now = now_us()
    params = {
        **instance_params(message.instance),
        "message_id": message.message_id,
        "payload": message.payload_json,
        "idempotency_key": message.idempotency_key,
        "sent_at": iso(to_datetime(now)),
        "sent_us": now,
        "visible_us": now + max(micros(message.delay_s), 0),
    }
    row = conn.execute(QUERIES["insert_message"], params).fetchone()
    if row is None:
        return _first_id(conn, message, params, first_wins=first_wins)
    conn.execute(QUERIES["enqueue"], {**params, "seq": row[0], "kind": message.kind.value})
    return message.message_id


def _first_id(conn: sqlite3.Connection, message: NewMessage, params: _Params, *, first_wins: bool) -> str:
    """The id a repeated send returns: the first one sent under its idempotency key, else its own, sent before."""
    if message.idempotency_key is not None:
        row = conn.execute(QUERIES["message_by_idempotency_key"], params).fetchone()
        if row is not None:
            first_id, payload = str(row[0]), row[1]
            if payload != message.payload_json and not first_wins:
                raise IdempotencyConflictError.of_message(message, first_id)
            return first_id
    return message.message_id


def publish_in(conn: sqlite3.Connection, event: NewEvent, *, first_wins: bool = False) -> str:
    """Append an event to its app's log and send its deliveries; return its id, or the first one's if it is a repeat.

    A repeat (its id already in the log, or its idempotency key used by an event still there with the same type and
    payload) appends nothing, deliveries included; so does, with ``first_wins`` (a turn commit's), the key of an
    event of another type or payload.

    Raises:
        IdempotencyConflictError: Without ``first_wins``, the key was used in the app by an event of another type
            or payload; nothing was written.
    """
    source = event.source
    params = {
        "app": event.app,
        "event_id": event.event_id,
        "type": event.type,
        "payload": event.payload_json,
        "handlers": json.dumps(list(event.handlers)),
        "source_app": None if source is None else source.app,
        "source_workflow": None if source is None else source.workflow,
        "source_workflow_id": None if source is None else source.workflow_id,
        "source_message_id": event.source_message_id,
        "idempotency_key": event.idempotency_key,
        "published_us": now_us(),
    }
    if conn.execute(QUERIES["insert_event"], params).fetchone() is None:
        row = conn.execute(QUERIES["first_event"], params).fetchone()
        if row is None:
            return event.event_id
        first_id = str(row[0])
        if first_id != event.event_id and (row[1], row[2]) != (event.type, event.payload_json) and not first_wins:
            raise IdempotencyConflictError.of_event(event, first_id)
        return first_id
    for delivery in event.deliveries:
        send_in(conn, delivery)
    return event.event_id


def ready_instances(
    conn: sqlite3.Connection, app: str, workflows: Sequence[str], now: int, limit: int
) -> list[tuple[str, str]]:
    """Up to ``limit`` instances of ``workflows`` a claim at ``now`` may take, first visible (then first sent) first.

    One indexed range per workflow (``ready_instances``), merged here: one range over all of the app's workflows
    would step over every ready instance of the workflows not asked for, at every claim.
    """
    found = []
    for workflow in workflows:
        params = {"app": app, "workflow": workflow, "now_us": now, "limit": limit}
        found += conn.execute(QUERIES["ready_instances"], params).fetchall()
    found.sort()  # by (next_visible_us, next_seq): a seq is unique, so the sort never compares further
    return [(workflow, workflow_id) for _, _, workflow, workflow_id in found[:limit]]


def nothing_ready(conn: sqlite3.Connection, app: str, workflows: Sequence[str]) -> tuple[list[Claim], int, int] | None:
    """What ``claim_in`` would return if no instance is ready (no claims, the newest seq, the clock); else None.

    Run outside any transaction, so that a claim finding nothing never takes the write lock: most claims of an idle
    worker find nothing, and each would otherwise queue behind (and delay) the writers of every other process.
    The newest seq is read first, each read seeing the file as it is then: a message sent after it has a newer seq,
    so the next wait sees it even if the read of the ready instances missed it.
    """
    latest = int(conn.execute(QUERIES["latest_seq"], {"app": app}).fetchone()[0])
    now = now_us()
    if ready_instances(conn, app, workflows, now, 1):
        return None
    return [], latest, now


def claim_in(
    conn: sqlite3.Connection, app: str, workflows: Sequence[str], worker: str, lease_us: int, limit: int
) -> tuple[list[Claim], int, int]:
    """Lease the ready instances; also return the app's newest seq and the clock reading the claim was made at.

    The next wait starts from both: a newer seq, or a next message becoming visible after that reading, may be
    work. An instance held back by a retry has no owner but a lease expiry in the future, so it is not ready
    yet; one whose next message is not visible yet is not ready either.
    """
    now = now_us()
    ready = ready_instances(conn, app, workflows, now, limit)
    claims = [
        _lease(conn, InstanceRef(app, workflow, workflow_id), worker, now + lease_us) for workflow, workflow_id in ready
    ]
    latest = int(conn.execute(QUERIES["latest_seq"], {"app": app}).fetchone()[0])
    return claims, latest, now


def _lease(conn: sqlite3.Connection, ref: InstanceRef, worker: str, expires_us: int) -> Claim:
    params = {**instance_params(ref), "worker": worker, "expires_us": expires_us}
    token, seq, state, version = conn.execute(QUERIES["lease_instance"], params).fetchone()
    message_id, payload, attempt = conn.execute(QUERIES["start_attempt"], {"seq": seq}).fetchone()
    # Always looked up, not only from attempt 2: a retried dead letter starts again at attempt 1, keeping its steps.
    steps = conn.execute(QUERIES["message_steps"], {"app": ref.app, "message_id": message_id}).fetchall()
    return Claim(
        ref,
        int(token),
        to_datetime(expires_us),
        message_id,
        payload,
        int(attempt),
        state,
        int(version),
        {str(name): str(result) for name, result in steps},
    )


def renew_in(conn: sqlite3.Connection, claims: Sequence[Claim], lease_us: int) -> list[bool]:
    """Extend each lease still held (not moved on, released or expired); False for each one lost."""
    now = now_us()
    times = {"now_us": now, "expires_us": now + lease_us}
    return [conn.execute(QUERIES["renew_lease"], {**claim_params(c), **times}).fetchone() is not None for c in claims]


def release_in(conn: sqlite3.Connection, claim: Claim) -> None:
    """Give a lease back if it is still held under the claim's token."""
    conn.execute(QUERIES["release_lease"], claim_params(claim))


# --- Writes under a claim: each checks the fence first ------------------------------------------------------


def commit_in(conn: sqlite3.Connection, commit: TurnCommit) -> int:
    """Commit one turn inside the caller's transaction and return the new state version.

    Its sends go out as ``send_in`` sends and its events as ``publish_in`` appends, after the fence let the commit
    through. A commit without state (a handler delivery's acknowledgement) writes no state and no history, and
    returns the version the turn read.

    Raises:
        LeaseLostError: The fence refused the claim; the caller must roll back what was written so far.
    """
    claim = commit.claim
    now = _check_fence(conn, claim)
    version = claim.state_version if commit.state_json is None else claim.state_version + 1
    written_at = iso(to_datetime(now))
    params = {
        **claim_params(claim),
        "state": commit.state_json,
        "version": version,
        "version_read": claim.state_version,
        "written_at": written_at,
        "completed_at": written_at,
        "now_us": now,
        "writer": commit.worker,
    }
    _finish_message(conn, claim, QUERIES["complete_message"], params)
    if commit.state_json is None:
        _move_on(conn, claim, QUERIES["release_unchanged"], params)
    else:
        _move_on(conn, claim, QUERIES["write_state"], params)
        conn.execute(QUERIES["append_state_history"], params)
        if version > STATE_HISTORY_LIMIT:
            conn.execute(QUERIES["trim_state_history"], {**params, "oldest_dropped": version - STATE_HISTORY_LIMIT})
    _record_turn(conn, commit, version_written=version, outcome=TurnOutcome.committed, error=None)
    for message in commit.sends:
        send_in(conn, message, first_wins=True)
    for event in commit.events:
        publish_in(conn, event, first_wins=True)
    return version


def _move_on(conn: sqlite3.Connection, claim: Claim, query: str, params: _Params) -> None:
    """Release the lease and move the inbox on, if the state is still at the version the turn read."""
    if conn.execute(query, params).fetchone() is None:
        raise lease_lost(claim, f"the state is no longer at version {claim.state_version}")


def fail_in(conn: sqlite3.Connection, failure: TurnFailure) -> None:
    """Fail one turn for good: message failed (dead-lettered, with when), instance paused, turn recorded."""
    claim = failure.claim
    now = _check_fence(conn, claim)
    params = {**claim_params(claim), "error": failure.error, "completed_at": iso(to_datetime(now)), "now_us": now}
    _finish_message(conn, claim, QUERIES["fail_message"], params)
    conn.execute(QUERIES["pause_instance"], params)
    _record_turn(conn, failure, version_written=None, outcome=TurnOutcome.failed, error=failure.error)


def record_step_in(conn: sqlite3.Connection, step: StepRecord) -> None:
    """Record a step's result for the claim's message, if the fence lets it; a name's first result stands."""
    now = _check_fence(conn, step.claim)
    params = {
        "app": step.claim.instance.app,
        "message_id": step.claim.message_id,
        "name": step.name,
        "result": step.result_json,
        "worker": step.worker,
        "duration_s": step.duration_s,
        "recorded_at": iso(to_datetime(now)),
    }
    conn.execute(QUERIES["record_step"], params)


def retry_in(conn: sqlite3.Connection, failure: TurnFailure, delay_us: int) -> None:
    """Record a failed attempt and release the lease, holding the instance until ``delay_us`` from now.

    The message stays pending with its (``visible_us``, ``seq``), and the instance's ``next_seq`` keeps pointing at
    it, so it runs first again; its attempt count is kept, and the next claim raises it.
    """
    claim = failure.claim
    now = _check_fence(conn, claim)
    if conn.execute(QUERIES["message_is_pending"], claim_params(claim)).fetchone() is None:
        raise lease_lost(claim, f"message {claim.message_id} is no longer pending")
    _record_turn(conn, failure, version_written=None, outcome=TurnOutcome.retry, error=failure.error)
    conn.execute(QUERIES["hold_instance"], {**claim_params(claim), "hold_until_us": now + max(delay_us, 0)})


def _check_fence(conn: sqlite3.Connection, claim: Claim) -> int:
    """Refuse a claim that no longer holds its instance's lease; return the clock reading it was checked at."""
    now = now_us()
    row = conn.execute(QUERIES["lease_of"], instance_params(claim.instance)).fetchone()
    if row is None:
        raise lease_lost(claim, "the instance does not exist")
    token, owner, expires_us, deleted = row
    if deleted:
        raise lease_lost(claim, "the instance was deleted")
    if token != claim.fencing_token:
        raise lease_lost(claim, f"the instance moved on to fencing token {token}")
    if owner is None or expires_us is None:
        raise lease_lost(claim, "the lease was released")
    if expires_us <= now:
        raise lease_lost(claim, "the lease expired")
    return now


def _finish_message(conn: sqlite3.Connection, claim: Claim, query: str, params: _Params) -> None:
    # Under a current lease the claimed message is pending; anything else means someone else settled it.
    if conn.execute(query, params).fetchone() is None:
        raise lease_lost(claim, f"message {claim.message_id} is no longer pending")


def _record_turn(
    conn: sqlite3.Connection,
    done: TurnCommit | TurnFailure,
    *,
    version_written: int | None,
    outcome: TurnOutcome,
    error: str | None,
) -> None:
    claim = done.claim
    params = {
        **claim_params(claim),
        "worker": done.worker,
        "attempt": claim.attempt,
        "version_read": claim.state_version,
        "version_written": version_written,
        "started_at": iso(done.started_at),
        "started_us": to_micros(done.started_at),
        "duration_s": done.duration_s,
        "outcome": outcome.value,
        "error": error,
    }
    conn.execute(QUERIES["record_turn"], params)


# --- Dead letters -------------------------------------------------------------------------------------------


def resolve_in(conn: sqlite3.Connection, instance: InstanceRef, *, skip: bool) -> str | None:
    """Retry or skip the failed message that pauses ``instance`` and un-pause it; None (nothing changed) if none.

    Retrying makes the message pending again with the (``visible_us``, ``seq``) it had, so it is the instance's next
    message again (the ones after it waited behind it) and ``next_seq`` points at it; skipping leaves ``next_seq``
    at the one after it.
    """
    params = instance_params(instance)
    row = conn.execute(QUERIES["dead_letter_of"], params).fetchone()
    if row is None:
        return None
    message_id = str(row[0])
    now = now_us()
    settle = {**params, "message_id": message_id, "completed_at": iso(to_datetime(now)), "now_us": now}
    conn.execute(QUERIES["skip_dead_letter" if skip else "requeue_dead_letter"], settle)
    conn.execute(QUERIES["resume_instance"], params)
    return message_id


# --- Pruning and deleting ---------------------------------------------------------------------------------


#: What deleting an instance deletes, in this order: the steps first (they are found through the messages), then
#: the messages (their idempotency keys are columns of theirs), past states and turn records.
_OWNED_BY_INSTANCE = (
    "delete_instance_steps",
    "delete_instance_messages",
    "delete_instance_history",
    "delete_instance_turns",
)


def prune_in(conn: sqlite3.Connection, app: str, finished_us: int, keys_us: int, limit: int) -> tuple[int, int, int]:
    """Delete one batch: up to ``limit`` finished messages (with their steps), turn records and events each.

    A handler delivery (its row's kind) whose message goes is deleted whole, row included: its id (the event's) is
    never reused, so no tombstone needs to keep its fencing token. A workflow instance's row stays.

    Returns:
        How many messages, turn records and events went; a count below ``limit`` means none of that kind is left.
    """
    params = {"app": app, "finished_us": finished_us, "keys_us": keys_us, "limit": limit}
    gone = conn.execute(QUERIES["prune_messages"], params).fetchall()
    conn.executemany(QUERIES["delete_message_steps"], [{"app": app, "message_id": m} for m, _, _ in gone])
    instances = {InstanceRef(app, w, wid) for _, w, wid in gone}
    deliveries = [instance_params(ref) for ref in instances if _kind_of(conn, ref) is InstanceKind.delivery]
    for query in (*_OWNED_BY_INSTANCE, "drop_instance"):
        conn.executemany(QUERIES[query], deliveries)
    turns = conn.execute(QUERIES["prune_turns"], params).rowcount
    events = conn.execute(QUERIES["prune_events"], params).rowcount
    return len(gone), turns, events


def _kind_of(conn: sqlite3.Connection, ref: InstanceRef) -> InstanceKind | None:
    """What the instance holds, as its row says; None if it has no row."""
    row = conn.execute(QUERIES["instance_kind"], instance_params(ref)).fetchone()
    return None if row is None else InstanceKind(row[0])


def delete_in(conn: sqlite3.Connection, instance: InstanceRef) -> bool:
    """Delete everything an instance owns, leaving its row as a tombstone; True if it existed.

    The tombstone keeps the fencing token and marks the row deleted, so the fence refuses a claim still held and a
    later send starts the instance afresh.
    """
    params = instance_params(instance)
    for query in _OWNED_BY_INSTANCE:
        conn.execute(QUERIES[query], params)
    return conn.execute(QUERIES["tombstone_instance"], params).fetchone() is not None


# --- Rows and times ---------------------------------------------------------------------------------------


def instance_params(ref: InstanceRef) -> _Params:
    """The named parameters that pick out an instance."""
    return {"app": ref.app, "workflow": ref.workflow, "workflow_id": ref.workflow_id}


def claim_params(claim: Claim) -> _Params:
    """The named parameters of a claim: its instance, token and message."""
    return {**instance_params(claim.instance), "token": claim.fencing_token, "message_id": claim.message_id}


def lease_lost(claim: Claim, reason: str) -> LeaseLostError:
    """The error refusing a claim, with why."""
    ref = claim.instance
    return LeaseLostError(f"{ref.app}:{ref.workflow}/{ref.workflow_id}", claim.fencing_token, reason)

"""The PostgreSQL broker's writes that run inside a transaction the caller opened: sends, events, turn commits.

``PostgresBroker`` opens one transaction per call and hands it to these functions, so that a turn's commit carries
the messages the turn sends and the events it emits (with their deliveries) in the same transaction: written all
together, or not at all when the fence refuses (the caller's transaction rolls back whatever came before).

Lock order. A transaction that locks several instance rows takes them in one order, that of
``(app, workflow, workflow_id)`` compared as Python strings (``_order``), so two transactions never wait on each
other in a cycle: a send locks its inbox, a commit locks its claim's instance together with its sends' inboxes
(those that sort before it first, then the claim's, then the rest), ``renew`` locks in the order it is given
(``PostgresBroker.renew`` sorts). The inboxes of an event's deliveries are locked last, after the event's row is
appended: they are new (delivery instance ids are event ids, and a repeated event appends nothing), so nobody
else holds or waits for them. Keyed events are appended in the order of their idempotency keys, so that two
commits emitting the same keys wait for each other in the same order (events without a key have fresh ids nobody
else appends, and keep the order given).

Statements queue on the connection and are read only when their result is needed, so that in pipeline mode they
travel together (see ``PostgresBroker._transaction``).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from psycopg.types.json import Jsonb

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
from keel.errors import IdempotencyConflictError, LeaseLostError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence
    from typing import LiteralString

    import psycopg
    from psycopg.rows import TupleRow

    from keel.backends.postgres.scripts import Script

    _Connection = psycopg.AsyncConnection[TupleRow]
    _Cursor = psycopg.AsyncCursor[TupleRow]
    #: The events queued for the log, in the order queued, and the cursor that says which were appended.
    _Logging = tuple[list[NewEvent], _Cursor]

#: The broker's statements, by name (``broker.sql``).
BROKER_QUERIES = load_queries(__package__ or __name__, "broker.sql")

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


def end_channel_for(schema: str, app: str) -> str:
    """Return the NOTIFY channel of the ends of ``app``'s messages in ``schema`` (``wait_for_end``).

    Apart from the work channel, so that workers never hear of ends, nor waiting clients of work.
    """
    readable = _UNSAFE.sub("_", app.lower())[:_READABLE_CHARS]
    digest = hashlib.blake2b(f"{schema}\0{app}\0ends".encode(), digest_size=8).hexdigest()
    return f"keel_ends_{readable}_{digest}"


async def send_in(
    conn: _Connection, schema: str, messages: Sequence[NewMessage], *, returning: bool = True
) -> list[str]:
    """Lock the messages' inboxes (creating new instances), then append each message as ``send`` does.

    Returns:
        With ``returning``, for each message its id or the id of the message first sent under its idempotency
        key; else nothing (and nothing waits for the server's answer).

    Raises:
        IdempotencyConflictError: With ``returning`` (``send``), a message's key holds a message with another
            payload; the caller's transaction must roll back. Without it (a commit's sends, first-wins, and an
            event's deliveries, which have no key) nothing is read, and such a message is just not appended.
    """
    await _lock_inboxes(conn, messages)
    return await _append(conn, schema, messages, returning=returning)


async def publish_in(conn: _Connection, schema: str, events: Sequence[NewEvent]) -> set[tuple[str, str]]:
    """Append to the log the events whose id and idempotency key it does not hold yet, and send their deliveries.

    Returns:
        The ``(app, event_id)`` of each event appended; the others (and their deliveries) were not written.
    """
    return await _deliver(conn, schema, await _log_events(conn, events))


async def commit_in(conn: _Connection, schema: str, commit: TurnCommit) -> Fenced:
    """Queue one turn commit, with its sends and events; its ``row()`` is the state version it leaves.

    Everything up to the events' log is queued before the fenced statement's answer is read, so it travels to the
    server in one round trip. A commit that sends or emits reads that answer here, before it goes on (when the fence
    refuses, what was queued rolls back with the caller's transaction); one that does neither (a handler delivery's
    acknowledgement) is left for the caller to read after its COMMIT, as ``queue_fenced`` allows.

    Raises:
        LeaseLostError: The claim is stale; the caller's transaction must roll back (nothing of this was written).
    """
    claim = commit.claim
    params = commit_params(commit, schema)
    own = _order(claim.instance)
    await _lock_inboxes(conn, (m for m in commit.sends if _order(m.instance) < own))
    written = await queue_fenced(conn, claim, BROKER_QUERIES["commit_turn"], params)
    await _lock_inboxes(conn, (m for m in commit.sends if _order(m.instance) > own))
    await _append(conn, schema, commit.sends, returning=False)
    logged = await _log_events(conn, commit.events)
    if commit.sends or commit.events:
        await written.row()
        await _deliver(conn, schema, logged)
    return written


class Fenced:
    """A fenced write queued on a connection: ``row()`` reads the server's answer, once it has come back.

    ``held`` reads what the locked instance row held, to say why the write was refused if it was.
    """

    def __init__(self, claim: Claim, held: Callable[[], Awaitable[tuple[Any, ...] | None]], written: _Cursor) -> None:
        self._claim = claim
        self._held = held
        self._written = written
        self._row: tuple[Any, ...] | None = None

    async def row(self) -> tuple[Any, ...]:
        """Return the statement's row.

        Raises:
            LeaseLostError: The statement returned no row: the lease was not live, and nothing was written.
        """
        if self._row is None:
            found = await self._written.fetchone()
            if found is None:
                problem = _lease_problem(self._claim, await self._held())
                raise LeaseLostError(_describe(self._claim.instance), self._claim.fencing_token, problem)
            self._row = found
        return self._row


async def queue_fenced(conn: _Connection, claim: Claim, query: LiteralString, params: dict[str, Any]) -> Fenced:
    """Lock the claim's instance row, then queue ``query``, a statement that writes only under a live lease.

    Locking first makes sends to this inbox wait, so the statement's snapshot (taken after the lock) shows every
    message sent before it, and its ``clock_timestamp()`` is read with the row held. A refused statement writes
    nothing, so when nothing else in the transaction depends on it, its answer can be read after the COMMIT: the
    whole write then takes one round trip.
    """
    locked = await conn.execute(BROKER_QUERIES["lock_instance"], instance_params(claim.instance))
    return Fenced(claim, locked.fetchone, await conn.execute(query, params))


def fenced_call(write: TurnCommit | StepRecord, schema: str) -> tuple[str, dict[str, Any]]:
    """The name of the one statement of a commit without sends or events, or of a step record, and its parameters."""
    if isinstance(write, StepRecord):
        claim = write.claim
        return "record_step", {
            **instance_params(claim.instance),
            "message_id": claim.message_id,
            "fencing_token": claim.fencing_token,
            "name": write.name,
            "result": write.result_json,
            "worker": write.worker,
            "duration_s": write.duration_s,
        }
    return "commit_turn", commit_params(write, schema)


def script_sends(script: Script, schema: str, messages: Sequence[NewMessage]) -> list[int]:
    """Queue on ``script`` the sends of ``messages``: their inboxes locked (new instances created), then each appended.

    Each append is a statement of its own and refuses on its own: a repeated id or key appends nothing, and a key
    holding another payload is a conflict that ``standing_id`` raises for that message alone, after the script ran;
    the others are written. Returns the index of each message's answer in the script's results.
    """
    params = _inbox_params(messages)
    if params is not None:
        script.add("lock_inboxes", params)
    return [script.add("append", _send_params(schema, message)) for message in messages]


def script_group(script: Script, schema: str, writes: Sequence[TurnCommit | StepRecord]) -> tuple[int, list[int]]:
    """Queue on ``script`` several fenced writes of different instances (group commit), each fenced on its own.

    Only writes of one statement each: commits that neither send nor emit, and step records. One statement locks
    every instance row first, in lock order, so that each write's snapshot shows every message sent before it (as
    ``queue_fenced`` does for one); then each write goes out. A refused write writes nothing, so it takes nothing of
    the others with it.

    Returns the index of the lock's answer (``held_rows`` reads it) and of each write's, for ``fenced_row``.
    """
    refs = sorted({w.claim.instance for w in writes}, key=_order)
    locked = script.add(
        "lock_instances",
        {
            "apps": [ref.app for ref in refs],
            "workflows": [ref.workflow for ref in refs],
            "workflow_ids": [ref.workflow_id for ref in refs],
        },
    )
    return locked, [script.add(*fenced_call(write, schema)) for write in writes]


def script_fenced(script: Script, claim: Claim, name: str, params: dict[str, Any]) -> tuple[int, int]:
    """Queue on ``script`` what ``queue_fenced`` queues: the claim's instance row locked, then statement ``name``.

    Returns the index of the lock's answer and of the statement's, for ``fenced_row``.
    """
    return script.add("lock_instance", instance_params(claim.instance)), script.add(name, params)


def held_rows(rows: Sequence[tuple[Any, ...]] | None) -> dict[InstanceRef, tuple[Any, ...]]:
    """What ``lock_instances`` found in each locked row, by instance."""
    return {InstanceRef(app, workflow, workflow_id): tuple(held) for app, workflow, workflow_id, *held in rows or ()}


def fenced_row(
    claim: Claim, written: Sequence[tuple[Any, ...]] | None, held: tuple[Any, ...] | None
) -> tuple[Any, ...]:
    """The row a scripted fenced statement returned.

    Raises:
        LeaseLostError: It returned none: the lease was not live, and nothing of it was written; ``held`` (the
            instance row its lock found, None if none) says why.
    """
    if not written:
        raise LeaseLostError(_describe(claim.instance), claim.fencing_token, _lease_problem(claim, held))
    return written[0]


def commit_params(commit: TurnCommit, schema: str) -> dict[str, Any]:
    """The parameters of the ``commit_turn`` statement (in ``schema``, whose end channel it notifies if waited)."""
    return {
        **turn_params(commit, TurnOutcome.committed),
        "state": commit.state_json,
        "history_limit": STATE_HISTORY_LIMIT,
        "end_channel": end_channel_for(schema, commit.claim.instance.app),
    }


async def _log_events(conn: _Connection, events: Sequence[NewEvent]) -> _Logging | None:
    """Queue the append of ``events`` to their logs, keyed events in the order of their keys; read by ``_deliver``."""
    if not events:
        return None
    # Of events repeating an id, the first given stands (as if appended one by one): the copies go before the
    # sort below, which could otherwise put a later copy, with another key or none, first and let in the next event
    # of the first copy's key.
    first_of_id: dict[tuple[str, str], NewEvent] = {}
    for event in events:
        first_of_id.setdefault((event.app, event.event_id), event)
    given = list(first_of_id.values())
    # Keyed events take the keyed places in the order of their keys (see the module docstring; the sort is stable,
    # so of two events with one key the first given is the one appended); the others keep their places, so events
    # are logged in the order given as far as the lock order allows.
    keyed = iter(sorted((e for e in given if e.idempotency_key is not None), key=lambda e: e.idempotency_key or ""))
    ordered = [next(keyed) if e.idempotency_key is not None else e for e in given]
    cursor = await conn.execute(BROKER_QUERIES["log_events"], {"events": Jsonb([_event_fields(e) for e in ordered])})
    return ordered, cursor


async def _deliver(conn: _Connection, schema: str, logging: _Logging | None) -> set[tuple[str, str]]:
    """Read which events ``_log_events`` appended and send their deliveries; return their ``(app, event_id)``."""
    if logging is None:
        return set()
    ordered, cursor = logging
    logged = {(str(app), str(event_id)) for app, event_id in await cursor.fetchall()}
    deliveries = [d for e in ordered if (e.app, e.event_id) in logged for d in e.deliveries]
    await send_in(conn, schema, deliveries, returning=False)
    return logged


async def _lock_inboxes(conn: _Connection, messages: Iterable[NewMessage]) -> None:
    """Create the messages' instances that are new (of the messages' kind) and lock every one's row, in lock order.

    The lock order is the module docstring's; an instance new here takes the kind of its first message in ``messages``.
    """
    params = _inbox_params(messages)
    if params is not None:
        await conn.execute(BROKER_QUERIES["lock_inboxes"], params)


def _inbox_params(messages: Iterable[NewMessage]) -> dict[str, Any] | None:
    """The parameters of ``lock_inboxes`` for the messages' instances, each once, in lock order; None for none."""
    kinds: dict[InstanceRef, InstanceKind] = {}
    for message in messages:
        kinds.setdefault(message.instance, message.kind)
    ordered = sorted(kinds, key=_order)
    if not ordered:
        return None
    return {
        "apps": [ref.app for ref in ordered],
        "workflows": [ref.workflow for ref in ordered],
        "workflow_ids": [ref.workflow_id for ref in ordered],
        "kinds": [kinds[ref].value for ref in ordered],
    }


async def _append(conn: _Connection, schema: str, messages: Sequence[NewMessage], *, returning: bool) -> list[str]:
    """Append each message to its inbox, locked before, in one batch.

    Returns:
        With ``returning``, the ids that stand for the messages (read at once); else nothing (nothing waits for
        the server here: in pipeline mode the batch goes out with the transaction's next sync).
    """
    if not messages:
        return []
    ids: list[str] = []
    params = [_send_params(schema, m) for m in messages]
    async with conn.cursor() as cursor:
        await cursor.executemany(BROKER_QUERIES["append"], params, returning=returning)
        if not returning:
            return ids
        async for _ in cursor.results():
            row = await cursor.fetchone()
            assert row is not None  # the statement always returns its one row
            ids.append(standing_id(messages[len(ids)], row))
    return ids


def standing_id(message: NewMessage, row: tuple[Any, ...]) -> str:
    """The id ``append`` says stands for ``message``; raise if its key holds a message with another payload."""
    first_id, conflict = str(row[0]), bool(row[1])
    if conflict:
        raise IdempotencyConflictError.of_message(message, first_id)
    return first_id


def _send_params(schema: str, message: NewMessage) -> dict[str, Any]:
    return {
        **instance_params(message.instance),
        "message_id": message.message_id,
        "payload": message.payload_json,
        "idempotency_key": message.idempotency_key,
        "delay_s": float(message.delay_s),
        "channel": channel_for(schema, message.instance.app),
    }


def _event_fields(event: NewEvent) -> dict[str, Any]:
    source = event.source
    return {
        "app": event.app,
        "event_id": event.event_id,
        "type": event.type,
        "payload": event.payload_json,
        "handlers": list(event.handlers),
        "source_app": None if source is None else source.app,
        "source_workflow": None if source is None else source.workflow,
        "source_workflow_id": None if source is None else source.workflow_id,
        "source_message_id": event.source_message_id,
        "idempotency_key": event.idempotency_key,
    }


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


def _order(ref: InstanceRef) -> tuple[str, str, str]:
    """The lock order of instance rows."""
    return (ref.app, ref.workflow, ref.workflow_id)


def instance_params(ref: InstanceRef) -> dict[str, Any]:
    """The statement parameters naming one instance."""
    return {"app": ref.app, "workflow": ref.workflow, "workflow_id": ref.workflow_id}


def turn_params(done: TurnCommit | TurnFailure, outcome: TurnOutcome) -> dict[str, Any]:
    """The statement parameters of a fenced write under ``done``'s claim that records a turn ending in ``outcome``."""
    claim = done.claim
    return {
        **instance_params(claim.instance),
        "message_id": claim.message_id,
        "fencing_token": claim.fencing_token,
        "version_read": claim.state_version,
        "attempt": claim.attempt,
        "worker": done.worker,
        "started_at": done.started_at,
        "duration_s": done.duration_s,
        "outcome": outcome.value,
    }


def _describe(ref: InstanceRef) -> str:
    return f"{ref.app}:{ref.workflow}/{ref.workflow_id}"

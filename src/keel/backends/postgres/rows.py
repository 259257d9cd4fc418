"""Rows of the PostgreSQL engine's statements as the contract's row types; timestamps come back in UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from keel.backends.base import (
    Claim,
    DeadLetter,
    EventRow,
    InstanceRef,
    MessageInfo,
    MessageStatus,
    StoredRecord,
    TurnOutcome,
    TurnRecordRow,
)


def stored_record(key: str, row: tuple[Any, ...]) -> StoredRecord:
    """A ``(version, value, written_at, writer)`` row as a ``StoredRecord`` of ``key``."""
    version, value_json, written_at, writer = row
    return StoredRecord(key, int(version), value_json, written_at.astimezone(UTC), writer)


def message_info(app: str, message_id: str, row: tuple[Any, ...]) -> MessageInfo:
    """A ``message`` row as a ``MessageInfo``."""
    workflow, workflow_id, status, state_version, error = row
    return MessageInfo(message_id, InstanceRef(app, workflow, workflow_id), MessageStatus(status), state_version, error)


def dead_letter(app: str, row: tuple[Any, ...]) -> DeadLetter:
    """A ``dead_letters`` row as a ``DeadLetter``."""
    workflow, workflow_id, message_id, error, attempts, failed_at = row
    return DeadLetter(InstanceRef(app, workflow, workflow_id), message_id, error, int(attempts), utc(failed_at))


def claim(app: str, row: tuple[Any, ...]) -> Claim:
    """A ``lease`` row as a ``Claim``."""
    workflow, workflow_id, token, expires_at, message_id, payload, attempts, state, state_version, names, results = row
    ref = InstanceRef(app, workflow, workflow_id)
    steps = dict(zip(names or (), results or (), strict=True))
    return Claim(ref, int(token), utc(expires_at), message_id, payload, int(attempts), state, int(state_version), steps)


def turn_record(instance: InstanceRef, row: tuple[Any, ...]) -> TurnRecordRow:
    """A ``turns`` row as a ``TurnRecordRow``."""
    message_id, worker, attempt, token, version_read, version_written, started_at, duration_s, outcome, error = row
    return TurnRecordRow(
        instance,
        message_id,
        worker,
        int(attempt),
        int(token),
        int(version_read),
        None if version_written is None else int(version_written),
        utc(started_at),
        float(duration_s),
        TurnOutcome(outcome),
        error,
    )


def event_row(app: str, row: tuple[Any, ...]) -> EventRow:
    """An ``events`` row as an ``EventRow``."""
    seq, event_id, type_, payload, handlers, source_app, source_workflow, source_workflow_id, *rest = row
    source_message_id, idempotency_key, published_at = rest
    source = None if source_app is None else InstanceRef(source_app, source_workflow, source_workflow_id)
    return EventRow(
        app,
        int(seq),
        event_id,
        type_,
        payload,
        tuple(handlers),
        source,
        source_message_id,
        idempotency_key,
        utc(published_at),
    )


def utc(moment: datetime) -> datetime:
    """A timestamp from the server, in UTC."""
    return moment.astimezone(UTC)

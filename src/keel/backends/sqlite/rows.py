"""Rows of the SQLite engine's tables as the contract's row types, and the clock and time encodings they use.

Times are stored as ISO text (``written_at``, ``started_at``) where they are only shown, and as integer
microseconds since the epoch (``*_us``) where SQL compares them, so that comparisons are exact.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from keel.backends.base import (
    DeadLetter,
    EventRow,
    InstanceRef,
    MessageInfo,
    MessageStatus,
    StoredRecord,
    TurnOutcome,
    TurnRecordRow,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stored_record(key: str, row: tuple[Any, ...]) -> StoredRecord:
    """A ``(version, value, written_at, writer)`` row as a ``StoredRecord`` of ``key``."""
    version, value_json, written_at, writer = row
    return StoredRecord(key, int(version), value_json, datetime.fromisoformat(written_at), writer)


def message_info(app: str, message_id: str, row: tuple[Any, ...]) -> MessageInfo:
    """A ``message_info`` row as a ``MessageInfo``."""
    workflow, workflow_id, status, version, error = row
    return MessageInfo(message_id, InstanceRef(app, workflow, workflow_id), MessageStatus(status), version, error)


def dead_letter(app: str, row: tuple[Any, ...]) -> DeadLetter:
    """A ``dead_letters`` row as a ``DeadLetter``."""
    workflow, workflow_id, message_id, error, attempts, failed_us = row
    return DeadLetter(
        InstanceRef(app, workflow, workflow_id), message_id, error or "", int(attempts), to_datetime(int(failed_us))
    )


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
        datetime.fromisoformat(started_at),
        float(duration_s),
        TurnOutcome(outcome),
        error,
    )


def event_row(app: str, row: tuple[Any, ...]) -> EventRow:
    """An ``events`` row as an ``EventRow``."""
    seq, event_id, type_, payload, handlers, src_app, src_workflow, src_workflow_id, src_message_id, key, us = row
    source = None if src_app is None else InstanceRef(src_app, src_workflow, src_workflow_id)
    return EventRow(
        app,
        int(seq),
        event_id,
        type_,
        payload,
        tuple(json.loads(handlers)),
        source,
        src_message_id,
        key,
        to_datetime(int(us)),
    )


def now_us() -> int:
    """This machine's clock, in microseconds since the epoch: the one clock every process on it shares."""
    return time.time_ns() // 1000


def micros(seconds: float) -> int:
    """Seconds as whole microseconds."""
    return round(seconds * 1_000_000)


def to_micros(moment: datetime) -> int:
    """A datetime as whole microseconds since the Unix epoch (a naive one read as local time, as ``iso`` does)."""
    return (moment.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)


def to_datetime(micros: int) -> datetime:
    """Microseconds since the Unix epoch as an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=micros)


def iso(moment: datetime) -> str:
    """A datetime as ISO text in UTC (a naive one read as local time)."""
    return moment.astimezone(UTC).isoformat()

"""Between the runtime scripts' replies and keel's row types: claims, turn records, dead letters, lost leases.

A turn record is kept as a JSON object with the keys ``message_id``, ``worker``, ``attempt``,
``fencing_token``, ``version_read``, ``version_written`` (null unless committed), ``started_at_us``,
``duration_s``, ``outcome`` (a ``TurnOutcome``: "committed", "failed" or "retry") and ``error``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from keel.backends.base import Claim, DeadLetter, InstanceRef, StoredRecord, TurnOutcome, TurnRecordRow
from keel.backends.redis.keys import parse_instance_member
from keel.errors import LeaseLostError

if TYPE_CHECKING:
    from keel.backends.base import TurnCommit, TurnFailure


#: Where the server's microsecond times count from.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The fields of a current-record hash (a store key's, or an instance's state), in the order HMGET returns them.
RECORD_FIELDS = ("v", "d", "t", "w")


def from_micros(text: str | int) -> datetime:
    """Microseconds since the epoch (as the server's ``TIME`` gives them) as a UTC datetime."""
    # Microseconds since the epoch as an integer: exact, where a float timestamp would round.
    return EPOCH + timedelta(microseconds=int(text))


def record_from_fields(key: str, fields: list[str | None]) -> StoredRecord | None:
    """A current-record hash's fields (``RECORD_FIELDS``) as a ``StoredRecord``, or None if there is none."""
    version, value_json, written_at, writer = fields
    if version is None:
        return None
    return StoredRecord(key, int(version), value_json, from_micros(written_at or 0), writer or "")


def record_from_entry(key: str, entry: str) -> StoredRecord:
    """A history entry (JSON) as a ``StoredRecord``."""
    fields: dict[str, str] = json.loads(entry)
    return StoredRecord(key, int(fields["v"]), fields.get("d"), from_micros(fields["t"]), fields.get("w", ""))


def micros(seconds: float) -> int:
    """Seconds as whole microseconds, the unit of every time the scripts keep."""
    return round(seconds * 1_000_000)


def micros_since_epoch(moment: datetime) -> int:
    """A moment as microseconds since the epoch."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def claim_from_row(row: list[Any]) -> Claim:
    """One claim of ``claim.lua``'s reply: the state JSON comes last, absent before the first commit."""
    member, token, expires_us, message_id, payload_json, attempt, state_version, steps = row[:8]
    state_json = row[8] if len(row) > 8 else None
    names_and_results = iter(steps)
    return Claim(
        InstanceRef(*parse_instance_member(member)),
        int(token),
        from_micros(expires_us),
        message_id,
        payload_json,
        int(attempt),
        state_json,
        int(state_version),
        dict(zip(names_and_results, names_and_results, strict=True)),
    )


def dead_letter_from_row(row: list[Any]) -> DeadLetter:
    """One dead letter of ``dead_letters.lua``'s reply."""
    member, message_id, error, attempts, failed_at_us = row
    return DeadLetter(
        InstanceRef(*parse_instance_member(member)), message_id, error, int(attempts), from_micros(failed_at_us)
    )


def turn_json(
    done: TurnCommit | TurnFailure, *, version_written: int | None, outcome: TurnOutcome, error: str | None
) -> str:
    """The JSON of one turn record, as the scripts push it."""
    claim = done.claim
    record = {
        "message_id": claim.message_id,
        "worker": done.worker,
        "attempt": claim.attempt,
        "fencing_token": claim.fencing_token,
        "version_read": claim.state_version,
        "version_written": version_written,
        "started_at_us": micros_since_epoch(done.started_at),
        "duration_s": done.duration_s,
        "outcome": outcome.value,
        "error": error,
    }
    return json.dumps(record, separators=(",", ":"))


def turn_from_json(instance: InstanceRef, entry: str) -> TurnRecordRow:
    """One kept turn record."""
    record: dict[str, Any] = json.loads(entry)
    return TurnRecordRow(
        instance,
        record["message_id"],
        record["worker"],
        record["attempt"],
        record["fencing_token"],
        record["version_read"],
        record["version_written"],
        from_micros(record["started_at_us"]),
        record["duration_s"],
        TurnOutcome(record["outcome"]),
        record["error"],
    )


def lease_lost(claim: Claim, reason: str, detail: str) -> LeaseLostError:
    """The error for a script's refusal ``{0, reason, detail}``."""
    ref = claim.instance
    reasons = {
        "token": f"the instance moved on to fencing token {detail}",
        "released": "the lease was released",
        "expired": "the lease expired",
        "version": f"the instance's state moved on to version {detail}",
        "message": f"message {claim.message_id} is no longer pending (status {detail})",
        "deleted": "the instance was deleted",
    }
    return LeaseLostError(
        f"{ref.app}:{ref.workflow}/{ref.workflow_id}", claim.fencing_token, reasons.get(reason, reason)
    )

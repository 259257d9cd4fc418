"""Logging set-up for keel's commands: every record shows which workflow, worker and state version it is about."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

#: The fields of G9, in the order they are shown; a handler's delivery has ``handler`` and ``event_id`` (and the
#: event's type, in the handler's own records) where a turn has ``state_version``.
CONTEXT_FIELDS = (
    "workflow",
    "workflow_id",
    "handler",
    "event_id",
    "event_type",
    "worker",
    "state_version",
    "fencing_token",
    "attempt",
    "message_id",
)


class ContextFormatter(logging.Formatter):
    """``time level logger: message [workflow=... workflow_id=... worker=... state_version=...]``."""

    def format(self, record: logging.LogRecord) -> str:
        """Format the record with its keel context fields appended."""
        text = super().format(record)
        fields = [f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name)]
        return f"{text} [{' '.join(fields)}]" if fields else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the keel context fields as keys: for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        """Format the record as one line of JSON."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in CONTEXT_FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    """Send keel's records to stderr, in text or JSON lines, at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

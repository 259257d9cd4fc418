"""Helpers shared by the SQLite-only tests: opening backends, sending, claiming, turn records, and old files.

The ``backend`` fixture built on these lives in this folder's ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from keel.backends import open_backend
from keel.backends._sql import load_queries
from keel.backends.base import (
    Backend,
    Claim,
    InstanceRef,
    NewMessage,
    StepRecord,
    StoreOptions,
    TurnCommit,
    TurnFailure,
)
from keel.backends.sqlite.backend import SqliteBackend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

APP = "loans"

#: The released schema sections, exactly as keel wrote older files (released sections are never edited).
_SECTIONS = load_queries("keel.backends.sqlite", "schema.sql")


# --- Backends on a file of their own -----------------------------------------------------------------------


async def open_sqlite(url: str) -> SqliteBackend:
    """A SQLite backend on a connection of its own; the caller closes it."""
    backend = await open_backend(url, StoreOptions())
    assert isinstance(backend, SqliteBackend)
    return backend


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[SqliteBackend]:
    """A backend on a connection of its own, as another process would have, closed at the end."""
    backend = await open_sqlite(url)
    try:
        yield backend
    finally:
        await backend.aclose()


async def timed_wait(backend: SqliteBackend, timeout_s: float) -> float:
    """How long ``wait_for_work`` took to return, in seconds."""
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=timeout_s)
    return time.monotonic() - started


def sql(url: str, query: str) -> list[tuple[object, ...]]:
    """Run one statement on a connection of the test's own, as another process would."""
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


# --- Messages, claims and what a turn writes ----------------------------------------------------------------


def ref(workflow_id: str = "42") -> InstanceRef:
    return InstanceRef(APP, "loan", workflow_id)


async def send(backend: Backend, instance: InstanceRef, *, key: str | None = None, delay_s: float = 0.0) -> str:
    """Send an empty message with a fresh id, optionally with an idempotency key or a delay."""
    return await backend.send(NewMessage(instance, uuid.uuid4().hex, "{}", key, delay_s))


async def claim_one(backend: Backend, *, lease_s: float = 5) -> Claim:
    """Claim as worker ``w1``, expecting exactly one claim."""
    [claim] = await backend.claim(APP, ["loan"], worker="w1", lease_s=lease_s, limit=1)
    return claim


def commit_of(claim: Claim, state: object = None) -> TurnCommit:
    """Worker ``w1``'s commit of ``state`` (``{}`` when not given)."""
    return TurnCommit(claim, json.dumps({} if state is None else state), "w1", datetime.now(UTC), 0.01)


def failure_of(claim: Claim) -> TurnFailure:
    return TurnFailure(claim, "RuntimeError: flaky", "w1", datetime.now(UTC), 0.01)


def step_of(claim: Claim, name: str, result: object = 1) -> StepRecord:
    return StepRecord(claim, name, json.dumps(result), "w1", 0.01)


# --- Files as older keel releases left them -----------------------------------------------------------------


def write_file(path: Path, *scripts: str) -> None:
    """Create or change the file at ``path`` by running ``scripts`` in order, as another program would."""
    with sqlite3.connect(path) as conn:
        for script in scripts:
            conn.executescript(script)


def write_version_file(path: Path, version: int, data: str) -> None:
    """A file as keel's schema ``version`` (2 or later) left it, with the SQL ``data`` run on it."""
    sections = ("bootstrap", "store_v1", *(f"runtime_v{n}" for n in range(2, version + 1)))
    write_file(path, *(_SECTIONS[section] for section in sections), data)

"""Helpers shared by the PostgreSQL engine tests: opening stores and backends, and raw SQL on a connection of the
test's own. Sending, claiming, committing, failing and recording steps come from ``tests._engine``.

The fixtures built on these (``backend``, ``other``, ``engine``) live in ``conftest.py`` next to this file.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psycopg

from keel.backends.base import StoreOptions
from keel.backends.postgres.backend import PostgresBackend, open_backend, open_engine
from tests._engine import APP

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Sequence
    from contextlib import AbstractAsyncContextManager

    from keel.backends.postgres.store import PostgresStore

#: The runtime's tables, each holding rows of instances.
RUNTIME_TABLES = ("keel_instances", "keel_messages", "keel_state_history", "keel_turns", "keel_steps", "keel_events")


# --- Opening stores and backends ---------------------------------------------------------------------------


class _Closable(Protocol):
    async def aclose(self) -> None: ...


_Opened = TypeVar("_Opened", bound=_Closable)


@contextlib.asynccontextmanager
async def _closing(opening: Awaitable[_Opened]) -> AsyncIterator[_Opened]:
    """What ``opening`` opens (a store or a backend), closed at the end of the block."""
    opened = await opening
    try:
        yield opened
    finally:
        await opened.aclose()


def opened_engine(url: str, options: StoreOptions | None = None) -> AbstractAsyncContextManager[PostgresStore]:
    """A store of its own on ``url``, closed at the end of the block."""
    return _closing(open_engine(url, StoreOptions() if options is None else options))


def opened_backend(url: str) -> AbstractAsyncContextManager[PostgresBackend]:
    """A backend of its own on ``url`` (its listener subscribed to nothing yet), closed at the end of the block."""
    return _closing(open_backend(url, StoreOptions()))


@contextlib.asynccontextmanager
async def backends_opened_together(url: str, count: int) -> AsyncIterator[list[PostgresBackend]]:
    """``count`` backends on ``url``, opened concurrently (so their migrations race), all closed at the end."""
    opened = await asyncio.gather(*(open_backend(url, StoreOptions()) for _ in range(count)))
    try:
        yield opened
    finally:
        for engine in opened:
            await engine.aclose()


# --- Raw SQL -----------------------------------------------------------------------------------------------


def db_rows(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    """Run ``query`` on a connection of the test's own, outside any store; its rows, if it returns any."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description is not None else []


def snapshot(url: str, tables: Sequence[str] = RUNTIME_TABLES) -> list[list[tuple[Any, ...]]]:
    """Every row of each of ``tables``, in a stable order: compare two snapshots to see that nothing was written."""
    return [db_rows(url, f"SELECT * FROM {table} ORDER BY 1, 2, 3") for table in tables]


def send_params(backend: PostgresBackend, message_id: str = "late") -> dict[str, object]:
    """The parameters of the broker's two send statements (``lock_inboxes``, ``append``) for a message to ``ref()``."""
    return {
        "apps": [APP],
        "workflows": ["loan"],
        "workflow_ids": ["42"],
        "kinds": ["workflow"],
        "app": APP,
        "workflow": "loan",
        "workflow_id": "42",
        "message_id": message_id,
        "payload": "{}",
        "idempotency_key": None,
        "delay_s": 0.0,
        "channel": backend.broker.listener.channel(APP),
    }

"""Helpers shared by the Redis tests: messages, claims and their outcomes, the server clock, and snapshots of the
test DB. The fixtures are in ``conftest.py``; the private redis-server is in ``_server.py``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from keel.backends import open_backend
from keel.backends.base import (
    Backend,
    Claim,
    InstanceRef,
    NewEvent,
    NewMessage,
    StepRecord,
    StoreOptions,
    TurnCommit,
    TurnFailure,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import pytest
    from redis.asyncio import Redis

APP = "loans"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STORE_LOGGER = "keel.backends.redis.connection"
MIGRATE_LOGGER = "keel.backends.redis.migrate"


# -- messages, claims and their outcomes ----------------------------------------------------------------------------


def ref(workflow_id: str = "42", workflow: str = "loan", app: str = APP) -> InstanceRef:
    return InstanceRef(app, workflow, workflow_id)


async def send(
    backend: Backend,
    instance: InstanceRef,
    payload: object = None,
    key: str | None = None,
    *,
    delay_s: float = 0.0,
    message_id: str = "",
) -> str:
    """Send ``payload`` as JSON, under a fresh message id unless one is given."""
    return await backend.send(NewMessage(instance, message_id or uuid.uuid4().hex, json.dumps(payload), key, delay_s))


async def claim_one(backend: Backend, *, worker: str = "w1", lease_s: float = 5.0) -> Claim:
    [claim] = await backend.claim(APP, ["loan"], worker=worker, lease_s=lease_s, limit=1)
    return claim


async def claim_all(backend: Backend, *, limit: int = 10, lease_s: float = 5.0) -> list[Claim]:
    return await backend.claim(APP, ["loan"], worker="w1", lease_s=lease_s, limit=limit)


def commit_of(
    claim: Claim,
    state: object = None,
    worker: str = "w1",
    *,
    sends: tuple[NewMessage, ...] = (),
    events: tuple[NewEvent, ...] = (),
) -> TurnCommit:
    return TurnCommit(claim, json.dumps(state), worker, datetime.now(UTC), 0.01, sends, events)


def failure_of(claim: Claim, error: str = "RuntimeError: flaky") -> TurnFailure:
    return TurnFailure(claim, error, "w1", datetime.now(UTC), 0.01)


def step_of(claim: Claim, name: str, result: object) -> StepRecord:
    return StepRecord(claim, name, json.dumps(result), "w1", 0.01)


# -- time -----------------------------------------------------------------------------------------------------------


def micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


async def server_now(raw: Redis) -> datetime:
    seconds, micro = await raw.time()
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micro)


async def server_now_us(raw: Redis) -> int:
    seconds, micro = await raw.time()
    return int(seconds) * 1_000_000 + int(micro)


# -- looking at the server ------------------------------------------------------------------------------------------


async def snapshot(raw: Redis) -> dict[str, Any]:
    """Everything in the test DB: each key's type, TTL and content."""
    readers: dict[str, Callable[[str], Awaitable[Any]]] = {
        "hash": raw.hgetall,
        "list": lambda name: raw.lrange(name, 0, -1),
        "zset": lambda name: raw.zrange(name, 0, -1, withscores=True),
        "stream": raw.xrange,
        "string": raw.get,
        "set": raw.smembers,
    }
    state: dict[str, Any] = {}
    for name in sorted(str(n) for n in await raw.keys("*")):
        kind = str(await raw.type(name))
        state[name] = (kind, await raw.ttl(name), await readers[kind](name))
    return state


def count_commands(monkeypatch: pytest.MonkeyPatch, client: Redis) -> list[str]:
    """Record the name of every command ``client`` sends from now on, in the list returned."""
    sent: list[str] = []
    original: Callable[..., Awaitable[Any]] = client.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await original(*args, **options)

    monkeypatch.setattr(client, "execute_command", counting)
    return sent


# -- the schema step ------------------------------------------------------------------------------------------------


def prefixed_url(redis_url: str, prefix: str) -> str:
    """``redis_url`` with ``prefix`` as its key prefix; the default prefix is left out of the URL."""
    return redis_url if prefix == "keel:" else f"{redis_url}?prefix={quote(prefix, safe='')}"


async def reopen(url: str) -> None:
    """Open a backend on ``url`` and close it again: an open at the current schema runs no upgrade."""
    reopened = await open_backend(url, StoreOptions())
    await reopened.aclose()

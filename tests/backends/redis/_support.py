"""Helpers shared by the Redis tests: the server clock, snapshots of the test DB and counted commands (messages,
claims and their outcomes come from ``tests._engine``). The fixtures are in ``conftest.py``; the private
redis-server is in ``_server.py``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from keel.backends import open_backend
from keel.backends.base import (
    StoreOptions,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import pytest
    from redis.asyncio import Redis

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STORE_LOGGER = "keel.backends.redis.connection"
MIGRATE_LOGGER = "keel.backends.redis.migrate"


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

"""Fixtures shared by the Redis tests: a plain client on the test DB and runtime backends opened on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from keel.backends import open_backend
from keel.backends.base import StoreOptions
from keel.backends.redis.backend import RedisBackend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keel.backends.base import Backend


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the test DB, to look at what the engine stored."""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    opened = await open_backend(redis_url, StoreOptions())
    assert isinstance(opened, RedisBackend)
    yield opened
    await opened.aclose()


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[Backend]:
    """A second backend on the same server: its own pools, as another process would have."""
    opened = await open_backend(redis_url, StoreOptions())
    yield opened
    await opened.aclose()

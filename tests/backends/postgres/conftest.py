"""Fixtures shared by the PostgreSQL engine tests: stores and backends on the test's own schema."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.backends.postgres._support import opened_backend, opened_engine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keel.backends.postgres.backend import PostgresBackend
    from keel.backends.postgres.store import PostgresStore


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[PostgresStore]:
    """A key-value store on the test's schema."""
    async with opened_engine(postgres_url) as opened:
        yield opened


@pytest.fixture
async def backend(postgres_url: str) -> AsyncIterator[PostgresBackend]:
    """A backend (store and broker) on the test's schema."""
    async with opened_backend(postgres_url) as opened:
        yield opened


@pytest.fixture
async def other(postgres_url: str) -> AsyncIterator[PostgresBackend]:
    """A second backend on the same schema: its own pool and its own listener, as another process would have."""
    async with opened_backend(postgres_url) as opened:
        yield opened

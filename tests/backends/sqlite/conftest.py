"""Fixtures shared by the SQLite-only tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.backends.sqlite._support import open_sqlite

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keel.backends.sqlite.backend import SqliteBackend


@pytest.fixture
async def backend(sqlite_url: str) -> AsyncIterator[SqliteBackend]:
    """A SQLite backend on the test's own file, closed at the end."""
    backend = await open_sqlite(sqlite_url)
    try:
        yield backend
    finally:
        await backend.aclose()

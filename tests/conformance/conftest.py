"""Fixtures of the engine-level conformance tests: a backend on each engine in turn, and a second one beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests._engine import opened

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keel.backends.base import Backend


@pytest.fixture
async def backend(backend_url: str) -> AsyncIterator[Backend]:
    """A backend on the test's own database of each engine in turn."""
    async with opened(backend_url) as opened_backend:
        yield opened_backend


@pytest.fixture
async def other(backend_url: str) -> AsyncIterator[Backend]:
    """A second backend on the same database: its own connections, as another process (or worker) would have."""
    async with opened(backend_url) as opened_backend:
        yield opened_backend

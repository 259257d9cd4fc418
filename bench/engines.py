"""Where each engine's benchmark runs: a fresh database, schema or DB index, removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import keel
from bench import loops

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The servers the benchmark uses; only loopback addresses.
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/14"


def _create_schema(url: str) -> None:
    """Open the store once, so that its tables exist before the raw loops run."""

    async def touch() -> None:
        async with keel.open_store(url) as store:
            await store.get("bench:touch")

    asyncio.run(touch())


@contextlib.contextmanager
def prepared(engine: str) -> Iterator[tuple[str, Callable[[str, str, float], int]]]:
    """Yield ``(url, raw_loop)`` for ``engine`` on a fresh place, cleaned up afterwards."""
    if engine == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'bench.db'}"
            _create_schema(url)
            yield url, loops.sqlite_raw_loop
    else:
        raise SystemExit(f"unknown engine {engine!r}; choose from sqlite, postgres, redis")

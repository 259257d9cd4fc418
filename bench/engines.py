"""Where each engine's benchmark runs: a fresh database, schema or DB index, removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import keel
from bench import loops

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The servers the benchmark uses; only loopback addresses.
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
#: A DB the benchmark flushes before and after (``KEEL_BENCH_REDIS_URL`` picks another, for runs side by side).
REDIS_URL = os.environ.get("KEEL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def _create_schema(url: str) -> None:
    """Open the store once, so that its tables exist before the raw loops run."""

    async def touch() -> None:
        async with keel.open_store(url) as store:
            await store.get("bench:touch")

    asyncio.run(touch())


@contextlib.contextmanager
def prepared(engine: str) -> Iterator[tuple[str, dict[str, Callable[[str, str, float], int]]]]:
    """Yield ``(url, {baseline name: raw loop})`` for ``engine`` on a fresh place, cleaned up afterwards."""
    if engine == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'bench.db'}"
            _create_schema(url)
            yield url, {"raw": loops.sqlite_raw_loop, "raw-thread": loops.sqlite_thread_loop}
    elif engine == "postgres":
        with _postgres_schema() as url:
            _create_schema(url)
            yield url, {"raw": loops.postgres_raw_loop}
    elif engine == "redis":
        with _redis_db() as url:
            _create_schema(url)
            yield url, {"raw": loops.redis_raw_loop}
    else:
        raise SystemExit(f"unknown engine {engine!r}; choose from sqlite, postgres, redis")


@contextlib.contextmanager
def _postgres_schema() -> Iterator[str]:
    import psycopg

    schema = f"keel_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{POSTGRES_DSN}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextlib.contextmanager
def _redis_db() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()

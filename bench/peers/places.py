"""A fresh place per measurement (a SQLite file, a PostgreSQL database, a private Redis) and its server processes."""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import engines, loops

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The raw single-row commit loop of each engine (``bench/loops.py``): the ceiling of the same run.
RAW_LOOPS: dict[str, Callable[[str, str, float], int]] = {
    "sqlite": loops.sqlite_raw_loop,
    "postgres": loops.postgres_raw_loop,
    "redis": loops.redis_raw_loop,
}


@dataclass(frozen=True)
class Place:
    """Where one measurement runs, and how to find the server processes working for it."""

    engine: str
    url: str
    #: The SQLite file (for sides that open it by path), else empty.
    path: str = ""
    server_pids: Callable[[], list[int]] = field(default=list)


@contextlib.contextmanager
def fresh(engine: str) -> Iterator[Place]:
    """Yield a new, empty place for ``engine``; remove it afterwards."""
    if engine == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "bench.db"
            yield Place(engine, f"sqlite:///{path}", str(path))
    elif engine == "postgres":
        with engines.fresh_postgres_database("keel_peers") as (url, name):
            yield Place(engine, url, server_pids=lambda: _postgres_backends(name))
    elif engine == "redis":
        with engines.private_redis_server() as (url, server):
            yield Place(engine, url, server_pids=lambda: [server.pid])
    else:
        raise SystemExit(f"unknown engine {engine!r}; choose from sqlite, postgres, redis")


def _postgres_backends(database: str) -> list[int]:
    """The server processes serving connections to ``database`` (the shared WAL writer and checkpointer are not)."""
    import psycopg

    with psycopg.connect(engines.POSTGRES_DSN, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)).fetchall()
    return [row[0] for row in rows]


def raw_commits_per_s(engine: str, seconds: float) -> float:
    """The engine's raw durable single-row commit rate, one connection, on a fresh place."""
    with fresh(engine) as place:
        engines.create_schema(place.url)
        done = RAW_LOOPS[engine](place.url, "bench:raw-commit", time.time() + seconds)
    return done / seconds

"""Where each engine's benchmark runs: a fresh database, schema or DB index, removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
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


def create_schema(url: str) -> None:
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
            create_schema(url)
            yield url, {"raw": loops.sqlite_raw_loop, "raw-thread": loops.sqlite_thread_loop}
    elif engine == "postgres":
        with _postgres_schema() as url:
            create_schema(url)
            yield url, {"raw": loops.postgres_raw_loop}
    elif engine == "redis":
        with _redis_db() as url:
            create_schema(url)
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


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "keel_bench") -> Iterator[tuple[str, str]]:
    """Yield ``(url, name)`` of a new, empty database on the benchmark's server; drop it (and its sessions) after."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_DSN.rsplit("/", 1)[0] + f"/{name}", name
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def private_redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yield ``(url, process)`` of a redis-server of our own on a free loopback port, every write fsynced.

    ``appendonly yes`` with ``appendfsync always``: a write is acknowledged once it is on disk, the durability
    the SQLite and PostgreSQL figures have. Its data lives in a temporary folder, removed after.
    """
    with tempfile.TemporaryDirectory() as folder:
        port = _free_loopback_port()
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", folder, "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--logfile", ""]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait_for_redis(url, server)
            yield url, server
        finally:
            server.terminate()
            server.wait(30)


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_redis(url: str, server: subprocess.Popen[bytes]) -> None:
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the private redis-server did not start (exit code {server.poll()})") from None
                time.sleep(0.05)
    finally:
        client.close()

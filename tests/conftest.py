"""Fixtures shared by every test: one backend URL per engine, isolated per test, and service probes.

A test that needs PostgreSQL or Redis is skipped when the service is absent on a developer's machine,
and fails when it is absent in CI (``CI=true``): CI must prove every engine.

Choose engines with ``--backend memory,sqlite`` or ``KEEL_TEST_BACKENDS=memory,sqlite``; all four by default.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from functools import cache
from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends import forget_memory

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

#: True in CI, where an absent service is a failure, not a skip.
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: The PostgreSQL server and database the tests use; each test gets its own schema in it.
PG_DSN = os.environ.get("KEEL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

#: The Redis server the tests use; each test gets the DB index below, flushed before and after.
REDIS_BASE = os.environ.get("KEEL_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_TEST_DB = int(os.environ.get("KEEL_TEST_REDIS_DB", "13"))

ALL_BACKENDS = ("memory", "sqlite", "postgres", "redis")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        default=os.environ.get("KEEL_TEST_BACKENDS", ",".join(ALL_BACKENDS)),
        help="comma-separated engines to run the conformance suite on (memory, sqlite, postgres, redis)",
    )


def selected_backends(config: pytest.Config) -> list[str]:
    names = [n.strip() for n in str(config.getoption("--backend")).split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_BACKENDS))
    if unknown:
        raise pytest.UsageError(f"unknown backend(s) {unknown}; choose from {list(ALL_BACKENDS)}")
    return names


def _service_missing(name: str, why: str) -> None:
    message = f"{name} is not reachable: {why}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: every engine must be tested)")
    pytest.skip(message)


@cache
def _postgres_problem() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'keel-runtime[postgres]')"
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip()
    return None


@cache
def _redis_problem() -> str | None:
    try:
        import redis
    except ImportError:
        return "redis is not installed (pip install 'keel-runtime[redis]')"
    try:
        client = redis.Redis.from_url(REDIS_BASE, socket_connect_timeout=3)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return str(exc).strip()
    return None


def require_postgres() -> None:
    problem = _postgres_problem()
    if problem:
        _service_missing("PostgreSQL", problem)


def require_redis() -> None:
    problem = _redis_problem()
    if problem:
        _service_missing("Redis", problem)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'keel.db'}"


@pytest.fixture
async def memory_url() -> AsyncIterator[str]:
    url = f"memory://test-{uuid.uuid4().hex}"
    yield url
    await forget_memory(url)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a schema of this test's own, dropped afterwards."""
    require_postgres()
    import psycopg

    schema = f"keel_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_DSN}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL on a DB index of the tests' own, flushed before and after the test."""
    require_redis()
    import redis

    url = f"{REDIS_BASE}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def _backend_params() -> list[object]:
    return [
        pytest.param("memory", id="memory"),
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
    ]


def _cross_process_params() -> list[object]:
    return [p for p in _backend_params() if getattr(p, "id", "") != "memory"]


@pytest.fixture(params=_backend_params())
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of each engine in turn: the conformance suite runs once per engine."""
    name = str(request.param)
    if name not in selected_backends(request.config):
        pytest.skip(f"{name} not selected (--backend / KEEL_TEST_BACKENDS)")
    url: str = request.getfixturevalue(f"{name}_url")
    return url


@pytest.fixture(params=_cross_process_params())
def shared_backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of each engine that several processes can share (every one but memory)."""
    name = str(request.param)
    if name not in selected_backends(request.config):
        pytest.skip(f"{name} not selected (--backend / KEEL_TEST_BACKENDS)")
    url: str = request.getfixturevalue(f"{name}_url")
    return url


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[keel.Store]:
    async with keel.open_store(backend_url) as opened:
        yield opened


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

"""The lock file keel's writers take turns at (``writelock``): waits in the kernel, woken at once, bounded by the busy
timeout, released by a crash, and never a requirement."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends.sqlite.location import lock_path
from tests.backends.sqlite._support import open_sqlite

if TYPE_CHECKING:
    from collections.abc import Iterator

    from keel.backends.sqlite.backend import SqliteBackend

#: A process that takes the lock file's flock, says so, and sleeps (until killed).
HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def lock_file(url: str) -> Path:
    return lock_path(Path(url.removeprefix("sqlite:///")))


@pytest.fixture
def held(sqlite_url: str) -> Iterator[int]:
    """Another holder of the lock file's flock (a file description of its own, as another process has)."""
    fd = os.open(lock_file(sqlite_url), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield fd
    finally:
        os.close(fd)


async def traced(backend: SqliteBackend) -> list[str]:
    """Every statement the backend's connection runs from now on."""
    seen: list[str] = []
    await backend.database.run(lambda conn: conn.set_trace_callback(seen.append))
    return seen


@contextlib.contextmanager
def holder(url: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock file's flock; killed at the end."""
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_file(url))], stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "locked"
            yield p
        finally:
            p.send_signal(signal.SIGCONT)
            p.kill()


async def test_a_writer_waits_for_the_lock_file_without_trying_sqlite(sqlite_url: str, held: int) -> None:
    backend = await open_sqlite(sqlite_url)
    try:
        seen = await traced(backend)
        writing = asyncio.create_task(backend.store.put("k", "1", expected_version=None, writer="t"))
        await asyncio.sleep(0.3)
        assert not writing.done()
        assert not [s for s in seen if s.startswith("BEGIN")]  # asleep in the kernel, not polling SQLite's lock
        fcntl.flock(held, fcntl.LOCK_UN)
        released_at = time.monotonic()
        record = await writing
        assert time.monotonic() - released_at < 0.1  # woken by the release itself, not a later look
        assert record.version == 1
    finally:
        await backend.aclose()


async def test_a_lock_held_past_the_busy_timeout_fails_the_write_and_is_not_kept(sqlite_url: str, held: int) -> None:
    backend = await open_sqlite(sqlite_url + "?busy_timeout_s=0.3")
    try:
        started = time.monotonic()
        with pytest.raises(keel.BackendOverloaded, match="write lock"):
            await backend.store.put("k", "1", expected_version=None, writer="t")
        assert 0.25 < time.monotonic() - started < 5
        fcntl.flock(held, fcntl.LOCK_UN)
        # The wait given up on ends once the holder let go: the lock is not kept with nobody to use it.
        other = os.open(lock_file(sqlite_url), os.O_RDONLY)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the abandoned wait kept the lock"
                    await asyncio.sleep(0.01)
            fcntl.flock(other, fcntl.LOCK_UN)
        finally:
            os.close(other)
        assert (await backend.store.put("k", "1", expected_version=None, writer="t")).version == 1
    finally:
        await backend.aclose()


async def test_a_stopped_holder_times_writers_out_and_they_go_on_once_it_resumes(sqlite_url: str) -> None:
    backend = await open_sqlite(sqlite_url + "?busy_timeout_s=0.3")
    try:
        with holder(sqlite_url) as process:
            process.send_signal(signal.SIGSTOP)
            with pytest.raises(keel.BackendOverloaded, match="write lock"):
                await backend.store.put("k", "1", expected_version=None, writer="t")
            waiting = asyncio.create_task(backend.store.put("k", "1", expected_version=None, writer="t"))
            await asyncio.sleep(0.05)
            process.send_signal(signal.SIGCONT)
            process.kill()  # its lock goes with it
            assert (await waiting).version == 1
    finally:
        await backend.aclose()


async def test_a_killed_holder_lets_the_writers_in_at_once(sqlite_url: str) -> None:
    backend = await open_sqlite(sqlite_url)
    try:
        with holder(sqlite_url) as process:
            writing = asyncio.create_task(backend.store.put("k", "1", expected_version=None, writer="t"))
            await asyncio.sleep(0.2)
            assert not writing.done()
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed_at = time.monotonic()
            assert (await writing).version == 1
            assert time.monotonic() - killed_at < 0.1
    finally:
        await backend.aclose()


async def test_writers_of_two_backends_on_one_file_take_turns(sqlite_url: str) -> None:
    first, second = await open_sqlite(sqlite_url), await open_sqlite(sqlite_url)  # a lock file description each
    try:
        pairs = [(f"{name}{n}", b) for n in range(50) for name, b in (("a", first), ("b", second))]
        records = await asyncio.gather(*(b.store.put(key, "1", expected_version=None, writer="t") for key, b in pairs))
        assert [r.version for r in records] == [1] * len(pairs)
        assert all([await first.store.get(key) is not None for key, _ in pairs])
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_lock_file_that_cannot_be_opened_leaves_sqlites_lock_alone(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    lock_file(sqlite_url).mkdir()  # a folder where the file would be
    backend = await open_sqlite(sqlite_url)
    try:
        with caplog.at_level(logging.WARNING, logger="keel"):
            assert (await backend.store.put("k", "1", expected_version=None, writer="t")).version == 1
            assert (await backend.store.put("k", "2", expected_version=1, writer="t")).version == 2
        warnings = [r for r in caplog.records if "lock file" in r.getMessage()]
        assert len(warnings) == 1  # once, then writers simply go without it
    finally:
        await backend.aclose()


def test_the_lock_file_is_next_to_the_database() -> None:
    assert lock_path(Path("/var/lib/app/keel.db")) == Path("/var/lib/app/keel.db-keel-lock")

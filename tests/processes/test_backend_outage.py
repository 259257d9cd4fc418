"""A `keel worker` rides out its backend going away and coming back, without a restart of its own."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

import keel
from tests.backends.postgres._server import PrivateServer, skip_unless_possible
from tests.backends.redis._server import DURABLE, private_redis
from tests.conftest import require_postgres, require_redis
from tests.processes._workers import WorkerProcess
from tests.processes.workflows import Step, app

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = [pytest.mark.processes, pytest.mark.slow]


async def _send_when_back(url: str, workflow_id: str, seq: int, within_s: float) -> str:
    """Send once the server answers again (the first calls after a restart may still fail)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            async with app.client(url=url) as client:
                return await client.send("counter", workflow_id, Step(seq=seq))
        except keel.BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.redis
async def test_a_worker_survives_a_redis_restart(tmp_path: Path) -> None:
    require_redis()  # the redis extra and a server binary; the private server below is the one used
    (tmp_path / "redis").mkdir()
    with private_redis(tmp_path / "redis", *DURABLE) as server:
        worker = WorkerProcess(server.url, tmp_path / "worker.log", lease_s=2.0)
        try:
            await _ride_out_a_restart(server.url, worker, server.kill, server.start)
        finally:
            assert worker.stop() == 0


@pytest.mark.postgres
async def test_a_worker_survives_a_postgres_restart(tmp_path: Path) -> None:
    require_postgres()
    skip_unless_possible()
    server = await asyncio.to_thread(PrivateServer.create)
    try:
        worker = WorkerProcess(server.url, tmp_path / "worker.log", lease_s=2.0)
        try:
            await _ride_out_a_restart(server.url, worker, server.kill, server.start)
        finally:
            assert worker.stop() == 0
    finally:
        await asyncio.to_thread(server.destroy)


async def _ride_out_a_restart(
    url: str, worker: WorkerProcess, kill: Callable[[], None], start: Callable[[], None]
) -> None:
    worker.wait_for_log("started for app process-tests")
    async with app.client(url=url) as client:
        before = await client.send("counter", "o", Step(seq=1))
        assert await client.wait("counter", "o", before, timeout_s=30) == 1
    await asyncio.to_thread(kill)
    await asyncio.sleep(2.0)  # the worker's claims fail meanwhile: it must log them and keep going
    assert worker.proc.poll() is None, worker.log()
    await asyncio.to_thread(start)
    after = await _send_when_back(url, "o", 2, within_s=30)
    async with app.client(url=url) as client:
        assert await client.wait("counter", "o", after, timeout_s=40) == 2
        state = await client.state("counter", "o")
    assert state is not None and state.value.applied == [1, 2]
    assert "is unavailable" in worker.log()  # the outage was reported, not swallowed

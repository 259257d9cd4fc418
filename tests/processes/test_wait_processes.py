"""``client.wait`` across processes: a real `keel worker` commits or dead-letters, and the waiting client wakes on the
engine's announcement at once (no polling: the client's safety re-read is put minutes away)."""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import InstanceRef, StoreOptions
from tests.processes._workers import WorkerProcess
from tests.processes.workflows import Step, app

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.processes]


def no_safety_rereads(client: keel.Client) -> None:
    client._open().broker.ends.recheck_s = 300.0  # type: ignore[attr-defined]


async def test_a_wait_wakes_at_once_on_a_commit_or_a_dead_letter_by_a_worker_process(
    shared_backend_url: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(shared_backend_url, tmp_path / "w.log", lease_s=5.0)
    try:
        worker.wait_for_log("started for app process-tests")
        backend = await open_backend(shared_backend_url, StoreOptions())
        lags = []
        try:
            async with app.client(url=shared_backend_url) as client:
                no_safety_rereads(client)
                for seq in range(8):
                    # The turn sleeps, so the wait is parked when the other process commits.
                    message_id = await client.send("counter", "waited", Step(seq=seq, sleep_s=0.2))
                    assert await client.wait("counter", "waited", message_id, timeout_s=30) == seq + 1
                    returned = time.time()
                    [turn] = await backend.turns(InstanceRef(app.name, "counter", "waited"), limit=1)
                    committed = turn.started_at + timedelta(seconds=turn.duration_s)
                    lags.append(returned - committed.timestamp())
                failing = await client.send("counter", "failing", Step(seq=0, sleep_s=0.2, fail=True))
                started = time.monotonic()
                with pytest.raises(keel.TurnFailedError, match="told to fail"):
                    await client.wait("counter", "failing", failing, timeout_s=30)
                assert time.monotonic() - started < 2.0
        finally:
            await backend.aclose()
    finally:
        assert worker.stop() == 0
    # The commit is timed inside the worker, before its COMMIT: the lag includes the commit itself.
    assert statistics.median(lags) < 0.1, lags
    assert max(lags) < 1.0, lags

"""Real `keel worker` processes: killed with SIGKILL mid-run (G4), paused with SIGSTOP past their lease (G2)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING

import pytest

from keel.backends import open_backend
from keel.backends.base import InstanceRef, StoreOptions
from tests.processes._workers import WorkerProcess
from tests.processes.workflows import Charge, Step, app

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.processes, pytest.mark.slow]

INSTANCES = 100
TURNS = 5


async def _send_all(client: object, sleep_s: float) -> dict[tuple[str, int], str]:
    async def one_instance(n: int) -> list[tuple[tuple[str, int], str]]:
        sent = []
        for seq in range(TURNS):
            message_id = await client.send("counter", f"i{n}", Step(seq=seq, sleep_s=sleep_s))  # type: ignore[attr-defined]
            sent.append(((f"i{n}", seq), message_id))
        return sent

    batches = await asyncio.gather(*(one_instance(n) for n in range(INSTANCES)))
    return dict(pair for batch in batches for pair in batch)


def _wait_for_turns_in_flight(worker: WorkerProcess, timeout_s: float = 30.0) -> None:
    """Return once ``worker`` has started a turn after its first commit: a kill right after this finds it in flight.

    Its turns sleep 0.3 s. Waiting for a commit alone is not enough: a worker's concurrent turns commit together
    (group commit) and log one by one after that commit, so a kill just after the first such line can land while
    every slot is between its commit and its next claim, with nothing in flight.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = worker.log()
        first_commit = log.find("turn committed")
        if first_commit >= 0 and log.find("turn started", first_commit) >= 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"the worker never started a turn after its first commit:\n{worker.log()}")


async def test_a_killed_worker_loses_nothing_and_its_turns_are_finished_by_others(
    shared_backend_url: str, tmp_path: Path
) -> None:
    workers = [WorkerProcess(shared_backend_url, tmp_path / f"w{i}.log", lease_s=2.0) for i in range(3)]
    try:
        for worker in workers:
            worker.wait_for_log("started for app process-tests")
        async with app.client(url=shared_backend_url) as client:
            sent = await _send_all(client, sleep_s=0.3)
            victim = workers[0]
            _wait_for_turns_in_flight(victim)
            victim.signal(signal.SIGKILL)
            victim.proc.wait()
            workers.append(WorkerProcess(shared_backend_url, tmp_path / "w3.log", lease_s=2.0))
            for (workflow_id, _), message_id in sent.items():
                await client.wait("counter", workflow_id, message_id, timeout_s=90)
            finals = {f"i{n}": await client.state("counter", f"i{n}") for n in range(INSTANCES)}
        for workflow_id, final in finals.items():
            assert final is not None, workflow_id
            assert final.value.applied == list(range(TURNS)), (workflow_id, final.value.applied)
            assert final.version == TURNS
        backend = await open_backend(shared_backend_url, StoreOptions())
        try:
            records = [
                turn
                for n in range(INSTANCES)
                for turn in await backend.turns(InstanceRef(app.name, "counter", f"i{n}"), limit=50)
            ]
        finally:
            await backend.aclose()
        committed = [t for t in records if t.outcome == "committed"]
        assert len(committed) == INSTANCES * TURNS  # every message committed exactly once
        retried = [t for t in committed if t.attempt > 1]
        assert retried, "the killed worker had turns in flight; another worker must have finished them"
        assert all(t.worker != victim.identity for t in retried)
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [-signal.SIGKILL, 0, 0, 0]  # the survivors exit cleanly on SIGTERM


async def test_a_paused_zombie_cannot_commit_after_another_worker_took_over(
    shared_backend_url: str, tmp_path: Path
) -> None:
    zombie = WorkerProcess(shared_backend_url, tmp_path / "zombie.log", lease_s=1.5)
    successor: WorkerProcess | None = None
    try:
        zombie.wait_for_log("started for app process-tests")
        async with app.client(url=shared_backend_url) as client:
            slow = await client.send("counter", "z", Step(seq=0, slow_first_attempt_s=4.0))
            zombie.wait_for_log("turn started")
            zombie.signal(signal.SIGSTOP)
            paused_at = time.monotonic()
            successor = WorkerProcess(shared_backend_url, tmp_path / "successor.log", lease_s=1.5)
            other = await client.send("counter", "y", Step(seq=0))
            assert await client.wait("counter", "y", other, timeout_s=30) == 1  # nothing else is blocked
            assert await client.wait("counter", "z", slow, timeout_s=30) == 1  # taken over after the lease
            assert time.monotonic() - paused_at < 30
            taken = await client.state("counter", "z")
            assert taken is not None
            assert taken.value.workers == [successor.identity]
            zombie.signal(signal.SIGCONT)
            await asyncio.sleep(5.0)  # the zombie's 4 s turn ends, and its commit (or heartbeat) finds the lease lost
            final = await client.state("counter", "z")
        assert final is not None
        assert (final.version, final.value.applied, final.value.workers) == (1, [0], [successor.identity])
        zombie_log = zombie.log()
        assert "lease is lost" in zombie_log or "lease lost" in zombie_log, zombie_log
        assert "turn committed" not in zombie_log.split("turn started", 1)[1]
    finally:
        codes = [zombie.stop()] + ([successor.stop()] if successor is not None else [])
    assert codes == [0] * len(codes)


async def test_a_step_done_before_a_crash_is_not_done_again(shared_backend_url: str, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    first = WorkerProcess(shared_backend_url, tmp_path / "first.log", lease_s=1.5)
    workers = [first]
    try:
        first.wait_for_log("started for app process-tests")
        async with app.client(url=shared_backend_url) as client:
            message_id = await client.send("payment", "p", Charge(ledger=str(ledger), pause_after_step_s=30))
            first.wait_for_log("step charge done and recorded")
            first.signal(signal.SIGKILL)  # after the step, before the turn commits
            first.proc.wait()
            workers.append(WorkerProcess(shared_backend_url, tmp_path / "second.log", lease_s=1.5))
            assert await client.wait("payment", "p", message_id, timeout_s=30) == 1
            state = await client.state("payment", "p")
        assert ledger.read_text().splitlines() == [str(state.value.charged_by_token if state else -1)]
        assert state is not None and state.value.attempts_seen == [2]  # only the finished attempt committed
        assert "step charge replayed" in workers[1].log()
    finally:
        for worker in workers:
            worker.stop()


async def test_a_zombies_step_record_is_rejected(shared_backend_url: str, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    zombie = WorkerProcess(shared_backend_url, tmp_path / "zombie.log", lease_s=1.5)
    successor: WorkerProcess | None = None
    try:
        zombie.wait_for_log("started for app process-tests")
        async with app.client(url=shared_backend_url) as client:
            message_id = await client.send("payment", "zp", Charge(ledger=str(ledger), pause_before_step_s=4))
            zombie.wait_for_log("turn started")
            zombie.signal(signal.SIGSTOP)
            successor = WorkerProcess(shared_backend_url, tmp_path / "successor.log", lease_s=1.5)
            assert await client.wait("payment", "zp", message_id, timeout_s=30) == 1
            zombie.signal(signal.SIGCONT)
            await asyncio.sleep(5.0)  # the zombie wakes, its pause ends, and it tries its step
            state = await client.state("payment", "zp")
        assert state is not None
        owner_token = state.value.charged_by_token
        assert state.value.attempts_seen == [2] and state.version == 1
        calls = ledger.read_text().splitlines()
        assert calls[0] == str(owner_token)
        assert len(calls) <= 2  # a zombie may still call the outside world (hence ctx.fencing_token) ...
        assert all(int(token) < owner_token for token in calls[1:])  # ... but only with its older token
        log = zombie.log()
        assert "lease" in log.split("turn started", 1)[1]
        assert "step charge done and recorded" not in log  # its record was refused (or never attempted)
    finally:
        zombie.stop()
        if successor is not None:
            successor.stop()


async def test_a_timer_survives_a_worker_restart_and_runs_on_time(shared_backend_url: str, tmp_path: Path) -> None:
    first = WorkerProcess(shared_backend_url, tmp_path / "first.log", lease_s=2.0)
    workers = [first]
    try:
        first.wait_for_log("started for app process-tests")
        async with app.client(url=shared_backend_url) as client:
            sent_at = time.time()
            timer = await client.send("counter", "timer", Step(seq=2), delay_s=4.0)
            now = await client.send("counter", "timer", Step(seq=1))
            assert await client.wait("counter", "timer", now, timeout_s=30) == 1
            assert first.stop() == 0  # the only worker goes away while the timer is pending
            workers.append(WorkerProcess(shared_backend_url, tmp_path / "second.log", lease_s=2.0))
            assert await client.wait("counter", "timer", timer, timeout_s=30) == 2
            state = await client.state("counter", "timer")
        assert state is not None and state.value.applied == [1, 2]
        backend = await open_backend(shared_backend_url, StoreOptions())
        try:
            [last, _] = await backend.turns(InstanceRef(app.name, "counter", "timer"), limit=2)
        finally:
            await backend.aclose()
        ran_at = last.started_at.timestamp() - sent_at
        assert 4.0 <= ran_at < 5.0  # on time, within a second
        assert last.worker == workers[1].identity
    finally:
        for worker in workers:
            worker.stop()

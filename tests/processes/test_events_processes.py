"""Events and handlers across real `keel worker` processes, one of them SIGKILLed mid-run (G3, G5).

The handlers append a line per run to a ledger file: the outside world. After a kill, a handler may have
written its line and died before acknowledging, so it runs again on another worker; the ledger then holds two
lines for that delivery, both with the same idempotency key, the first from the killed worker. Anything else
(a missing line, a rerun on a live worker, an event of a failed attempt) fails the test.
"""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from typing import TYPE_CHECKING

import pytest

from keel.backends import open_backend
from keel.backends.base import InstanceRef, MessageStatus, StoreOptions
from tests.processes._workers import WorkerProcess
from tests.processes.workflows import Order, Relay, app

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.processes, pytest.mark.slow]

INSTANCES = 200
FLAKY_EVERY = 20
DOOMED = 5


def _ledger_lines(ledger: Path) -> list[list[str]]:
    if not ledger.exists():
        return []
    return [line.split() for line in ledger.read_text().splitlines() if line.strip()]


async def _until(check: object, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s}s")
        await asyncio.sleep(0.1)


async def test_every_event_reaches_both_handlers_once_despite_a_killed_worker(
    shared_backend_url: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    workers = [WorkerProcess(shared_backend_url, tmp_path / f"w{i}.log", lease_s=2.0) for i in range(3)]
    try:
        for worker in workers:
            worker.wait_for_log("started for app process-tests")
        async with app.client(url=shared_backend_url) as client:
            sent = {}
            for n in range(INSTANCES):
                order = Order(ledger=str(ledger), handler_sleep_s=0.05, flaky_after_emit=n % FLAKY_EVERY == 0)
                sent[f"o{n}"] = await client.send("order", f"o{n}", order)
            doomed = {}
            for n in range(DOOMED):
                doomed[f"d{n}"] = await client.send("order", f"d{n}", Order(ledger=str(ledger), fail_after_emit=True))
            victim = workers[0]
            victim.wait_for_log("handler confirm done")
            victim.signal(signal.SIGKILL)
            victim.proc.wait()
            workers.append(WorkerProcess(shared_backend_url, tmp_path / "w3.log", lease_s=2.0))

            for workflow_id, message_id in sent.items():
                await client.wait("order", workflow_id, message_id, timeout_s=90)
            events = await client.events(limit=2 * INSTANCES)
            assert len(events) == INSTANCES  # one per committed turn; none from a failed attempt or a doomed one
            for event in events:
                await client.wait_event(event.event_id, timeout_s=90)
            for workflow_id, message_id in doomed.items():
                info = await client._open().message(app.name, message_id)
                assert info is not None
                assert info.status is MessageStatus.failed, workflow_id
            await asyncio.sleep(1.0)  # any late duplicate would land by now
        by_order = {e.payload["order_id"]: e for e in events}
        assert set(by_order) == set(sent)

        runs: dict[tuple[str, str], list[list[str]]] = defaultdict(list)
        for handler, event_id, key, ran_on, emitted_by in _ledger_lines(ledger):
            runs[(handler, event_id)].append([key, ran_on, emitted_by])
        expected = {(h, e.event_id) for e in events for h in ("confirm", "bill")}
        assert set(runs) == expected  # none missing, none from an event that was never committed
        reruns = 0
        for (handler, event_id), lines in runs.items():
            assert {key for key, _, _ in lines} == {f"{handler}:{event_id}"}
            if len(lines) > 1:
                reruns += 1
                # Only a delivery in flight on the killed worker may have run twice, the first time there.
                assert len(lines) == 2, lines
                assert lines[0][1] == victim.identity, lines
        backend = await open_backend(shared_backend_url, StoreOptions())
        try:
            for event in events:
                order_id = event.payload["order_id"]
                turns = await backend.turns(InstanceRef(app.name, "order", order_id), limit=10)
                [committed] = [t.attempt for t in turns if t.outcome == "committed"]
                # The event that reached the handlers is the committed attempt's; a failed attempt's never does.
                assert event.payload["emitted_by_attempt"] == committed, (order_id, turns)
                if int(order_id[1:]) % FLAKY_EVERY == 0:
                    assert committed >= 2
        finally:
            await backend.aclose()
        assert reruns <= 2 * 8  # at most what the victim could hold: concurrency 8, two handlers
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [-signal.SIGKILL, 0, 0, 0]


async def test_a_killed_handlers_send_and_publish_happen_once(shared_backend_url: str, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    first = WorkerProcess(shared_backend_url, tmp_path / "first.log", lease_s=1.5)
    workers = [first]
    try:
        first.wait_for_log("started for app process-tests")
        async with app.client(url=shared_backend_url) as client:
            event_id = await client.publish(Relay(target="r1", seq=7, ledger=str(ledger), pause_first_attempt_s=60))
            await _until(lambda: any(line[:2] == ["relay", "1"] for line in _ledger_lines(ledger)), 30, "relay 1")
            first.signal(signal.SIGKILL)  # after the send and publish were queued, before the acknowledgement
            first.proc.wait()
            workers.append(WorkerProcess(shared_backend_url, tmp_path / "second.log", lease_s=1.5))
            await client.wait_event(event_id, timeout_s=60)
            await _until(lambda: any(line[0] == "relayed" for line in _ledger_lines(ledger)), 30, "relayed")
            state = None
            for _ in range(100):
                state = await client.state("counter", "r1")
                if state is not None:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # a duplicate send or publish would have run by now
            final = await client.state("counter", "r1")
            relayed_events = [e for e in await client.events(limit=50) if e.type == "Relayed"]
        assert state is not None
        assert final is not None
        assert (final.version, final.value.applied) == (1, [7])  # the handler's send: one turn
        assert len(relayed_events) == 1  # the handler's publish: one event
        lines = _ledger_lines(ledger)
        assert [line[:2] for line in lines if line[0] == "relay"] == [["relay", "1"], ["relay", "2"]]
        assert len([line for line in lines if line[0] == "relayed"]) == 1
        assert workers[1].identity in {line[2] for line in lines if line[0] == "relay"}
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [-signal.SIGKILL, 0]

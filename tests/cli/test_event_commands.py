"""`keel events`, and `keel dead` / `retry` / `skip` / `trace` on handler deliveries.

The command functions run in process on a memory backend with an in-process worker; one test runs the real
`keel events` subprocess against a real `keel worker` on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING

import pytest

from keel.commands import list_dead_letters, list_events, resolve_dead_letter, trace
from keel.errors import TurnFailedError
from keel.records import HandlerDelivery
from tests.cli.test_runtime_commands import keel
from tests.conformance.test_events import Ledger, Order, Shipped, make_app
from tests.conformance.test_runtime import running_worker
from tests.processes._workers import APP_PATH, WorkerProcess

if TYPE_CHECKING:
    from pathlib import Path


async def test_events_dead_retry_skip_and_trace_speak_of_handlers_and_events() -> None:
    url = f"memory://cli-{uuid.uuid4().hex}"
    app = make_app(url, Ledger())
    async with app.client() as client, running_worker(app, url):
        message_id = await client.send("order", "o1", Order(item="book"))
        await client.wait("order", "o1", message_id, timeout_s=10)
        poison = await client.publish(Shipped(order_id="o2", item="poison"))
        with pytest.raises(TurnFailedError):
            await client.wait_event(poison, timeout_s=10)
        [emitted] = [e for e in await client.events() if e.source is not None]
        await client.wait_event(emitted.event_id, timeout_s=10)

        listing = await list_events(app, None, 20, as_json=False)
        first, second = listing.split("\n    audit")[0], listing
        assert f"Shipped  {poison}  published by a client" in first
        assert "    mail                     failed: keel.errors.NonRetryable: this address is banned" in listing
        assert f"Shipped  {emitted.event_id}  emitted by order o1" in second
        documents = json.loads(await list_events(app, None, 20, as_json=True))
        assert documents[1]["deliveries"] == {
            "mail": {"status": "done", "error": None},
            "audit": {"status": "done", "error": None},
        }
        assert documents[0]["source"] is None
        assert documents[1]["source"] == {"workflow": "order", "workflow_id": "o1"}

        dead = await list_dead_letters(app, None, 10, app_path="shop.workflows:app")
        assert f"handler mail  event {poison}" in dead
        assert f"keel retry shop.workflows:app --handler mail {poison} runs it again" in dead
        delivery = HandlerDelivery("mail", poison)
        timeline = await trace(app, None, delivery, 10, as_json=False)
        assert timeline.startswith(f"handler mail on event {poison}: 1 turn record(s)\n")
        assert "failed" in timeline
        assert " -> " not in timeline and " v0" not in timeline  # a delivery has no state versions
        [record] = json.loads(await trace(app, None, delivery, 10, as_json=True))
        assert (record["version_read"], record["version_written"], record["outcome"]) == (None, None, "failed")
        retried = await resolve_dead_letter(app, None, delivery, skip=False)
        assert retried == f"event {poison} will be delivered to handler mail again"
        await asyncio.sleep(0.3)
        skipped = await resolve_dead_letter(app, None, delivery, skip=True)
        assert skipped.startswith("skipped message")
        assert skipped.endswith(f"event {poison} will not reach handler mail")
    assert await list_events(make_app(f"memory://cli-{uuid.uuid4().hex}", Ledger()), None, 5, as_json=False) == (
        "no events (none published yet, or all pruned)"
    )


@pytest.mark.processes
def test_keel_events_shows_each_handlers_delivery(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    ledger = tmp_path / "ledger.txt"
    worker = WorkerProcess(url, tmp_path / "worker.log", lease_s=2.0)
    try:
        worker.wait_for_log("started for app process-tests")
        sent = keel("send", APP_PATH, "order", "o1", json.dumps({"ledger": str(ledger)}), "--url", url, "--wait", "30")
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 30
        while True:
            shown = keel("events", APP_PATH, "--url", url, "--json")
            assert shown.returncode == 0, shown.stderr
            [event] = json.loads(shown.stdout)
            if all(d["status"] == "done" for d in event["deliveries"].values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert event["type"] == "Placed"
        assert set(event["deliveries"]) == {"confirm", "bill"}
        assert {d["status"] for d in event["deliveries"].values()} == {"done"}
        text = keel("events", APP_PATH, "--url", url, "--limit", "5")
        assert "emitted by order o1" in text.stdout
        assert "confirm" in text.stdout
        assert keel("events", APP_PATH, "--url", url, "--limit", "0").returncode == 2
        placed = {"order_id": "p1", "ledger": str(ledger), "emitted_by_attempt": 0}
        published = keel("publish", APP_PATH, "Placed", json.dumps(placed), "--url", url, "--wait", "30")
        assert published.returncode == 0, published.stderr
        event_id = published.stdout.strip()
        assert len(event_id) == 32
        runs = sorted(line.split()[0] for line in ledger.read_text().splitlines() if event_id in line)
        assert runs == ["bill", "confirm"]  # --wait returned after both handlers succeeded
    finally:
        assert worker.stop() == 0
    assert "handlers bill (Placed), confirm (Placed), relay (Relay), relayed (Relayed)" in worker.log()

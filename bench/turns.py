"""Benchmark: durable turns per second through real `keel worker` processes, and send→commit latency.

For each engine: the raw engine commit rate (the raw-driver compare-and-swap loop of ``store_update``, one
process) as the baseline; then turns/s with 1 and 2 worker processes over many instances, every message sent
at once and timed from the first send to the last commit; then durable steps/s of the ``stepped`` workflow
(three no-op steps) with 1 and 2 workers, closed loop: ``--callers`` tasks each send to a fresh instance and
wait for its commit, again and again for ``--seconds``; then, with one idle worker, the latency from ``send``
to the turn's commit (taken from the turn record, so the client's wake-up does not blur it), and from ``send``
to ``client.wait`` returning.

Run: ``python -m bench.turns [--engines sqlite,postgres,redis] [--instances 200] [--turns 5] [--callers 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import engines
from bench.turns_app import STEPS, Tick, app
from bench.workers import run_engines, start_workers, stop_workers
from keel.backends import open_backend
from keel.backends.base import InstanceRef, StoreOptions

if TYPE_CHECKING:
    from collections.abc import Coroutine

ROOT = Path(__file__).resolve().parent.parent


async def throughput(url: str, tag: str, instances: int, turns: int) -> float:
    async with app.client(url=url) as client:
        started = time.perf_counter()

        async def one(n: int) -> list[str]:
            return [await client.send("tick", f"{tag}-{n}", Tick(n=t)) for t in range(turns)]

        sent = await asyncio.gather(*(one(n) for n in range(instances)))
        for n, ids in enumerate(sent):
            await client.wait("tick", f"{tag}-{n}", ids[-1], timeout_s=300)
        return instances * turns / (time.perf_counter() - started)


async def closed_loop(url: str, tag: str, callers: int, seconds: float) -> float:
    """Durable steps/s of ``callers`` tasks, each sending a ``stepped`` message to a fresh instance and waiting."""
    async with app.client(url=url) as client:
        done = 0
        deadline = time.perf_counter() + seconds

        async def caller(c: int) -> None:
            nonlocal done
            n = 0
            while time.perf_counter() < deadline:
                workflow_id = f"{tag}-{c}-{n}"
                await client.wait(
                    "stepped", workflow_id, await client.send("stepped", workflow_id, Tick(n=n)), timeout_s=60
                )
                done, n = done + 1, n + 1

        started = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        return done * STEPS / (time.perf_counter() - started)


async def latencies(url: str, samples: int) -> tuple[list[float], list[float]]:
    """Send→commit (from the turn record) and send→``wait()`` returned, in ms, for ``samples`` messages one by one."""
    backend = await open_backend(url, StoreOptions())
    committed, waited = [], []
    try:
        async with app.client(url=url) as client:
            for n in range(samples):
                sent_at = datetime.now(UTC)
                message_id = await client.send("tick", "latency", Tick(n=n))
                await client.wait("tick", "latency", message_id, timeout_s=30)
                returned_at = datetime.now(UTC)
                [turn] = await backend.turns(InstanceRef(app.name, "tick", "latency"), limit=1)
                committed_at = turn.started_at + timedelta(seconds=turn.duration_s)
                committed.append((committed_at - sent_at).total_seconds() * 1000)
                waited.append((returned_at - sent_at).total_seconds() * 1000)
                await asyncio.sleep(0.05)  # idle between messages
    finally:
        await backend.aclose()
    return committed, waited


def _with_workers(url: str, count: int, measure: Coroutine[Any, Any, float]) -> float:
    """Run ``measure`` with ``count`` fresh ``keel worker`` processes serving the bench's app, stopped after."""
    try:
        workers = start_workers("bench.turns_app:app", url, count)
    except BaseException:
        measure.close()  # never started: no "coroutine was never awaited" warning
        raise
    try:
        return asyncio.run(measure)
    finally:
        stop_workers(workers)


def run_engine(engine: str, args: argparse.Namespace) -> dict[str, object]:
    with engines.prepared(engine) as (url, baselines):
        raw = baselines["raw"](url, "bench:raw-commit", time.time() + args.seconds) / args.seconds
        row: dict[str, object] = {"engine": engine, "raw_commits_per_s": round(raw, 1)}
        for count in (1, 2):
            rate = _with_workers(url, count, throughput(url, f"w{count}", args.instances, args.turns))
            row[f"turns_per_s_{count}w"] = round(rate, 1)
            row[f"ratio_{count}w"] = round(rate / raw, 3)
        for count in (1, 2):
            steps = _with_workers(url, count, closed_loop(url, f"s{count}", args.callers, args.seconds))
            row[f"stepped_steps_per_s_{count}w"] = round(steps, 1)
            row[f"stepped_ratio_{count}w"] = round(steps / raw, 3)
        workers = start_workers("bench.turns_app:app", url, 1)
        try:
            sample, waited = asyncio.run(latencies(url, args.samples))
        finally:
            stop_workers(workers)
        row["latency_p50_ms"] = round(statistics.median(sample), 1)
        row["latency_p99_ms"] = round(statistics.quantiles(sample, n=100)[98], 1)
        row["wait_p50_ms"] = round(statistics.median(waited), 1)
        row["wait_p99_ms"] = round(statistics.quantiles(waited, n=100)[98], 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres,redis")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/turns.json"))
    args = parser.parse_args(argv)
    return run_engines("turns", args, run_engine)


if __name__ == "__main__":
    raise SystemExit(main())

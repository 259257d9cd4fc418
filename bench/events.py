"""Benchmark: events from a turn to a handler in another `keel worker` process, latency and throughput.

For each engine: the raw engine commit rate (as in ``bench.turns``) as the baseline; then two worker processes,
one running only the turns and one only the handler (``keel worker --only``), so every delivery crosses
processes; a client sends one message at a time at a fixed rate (200/s by default) to distinct instances; each
turn emits an event stamped with the wall clock, and the handler notes, when it starts, how long ago that was
(after an unmeasured warm-up at the same rate, ``--warm-up-s``).
Then saturation: every message sent at once, events/s from the first send to the last handler start.

Run: ``python -m bench.events [--engines sqlite,postgres,redis] [--rate 200] [--seconds 10] [--burst 2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench import engines
from bench.events_app import Emit, app
from bench.workers import run_engines, start_workers, stop_workers


def read_ledger(path: Path) -> list[tuple[float, bool, float]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        latency, crossed, started = line.split()
        rows.append((float(latency), crossed == "1", float(started)))
    return rows


async def wait_for_lines(path: Path, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(read_ledger(path)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(read_ledger(path))} of {count} deliveries within {timeout_s}s")
        await asyncio.sleep(0.1)


async def fixed_rate(url: str, ledger: Path, rate: float, seconds: float, *, tag: str = "rate") -> None:
    """Send ``rate`` messages a second for ``seconds``, each at its own time, not in bursts."""
    total = int(rate * seconds)
    async with app.client(url=url) as client:
        started = time.perf_counter()
        pending = set()
        for n in range(total):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.add(asyncio.create_task(client.send("emitter", f"{tag}-{n}", Emit(ledger=str(ledger)))))
            pending = {task for task in pending if not task.done()}
        await asyncio.gather(*pending)
    await wait_for_lines(ledger, total, 120)


async def saturation(url: str, ledger: Path, burst: int) -> float:
    async with app.client(url=url) as client:
        started = time.time()
        await asyncio.gather(*(client.send("emitter", f"burst-{n}", Emit(ledger=str(ledger))) for n in range(burst)))
    await wait_for_lines(ledger, burst, 300)
    last_start = max(started_at for _, _, started_at in read_ledger(ledger))
    return burst / (last_start - started)


def percentiles(sample: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(sample, n=100)
    return round(statistics.median(sample), 1), round(cuts[98], 1)


def run_engine(engine: str, args: argparse.Namespace) -> dict[str, object]:
    with engines.prepared(engine) as (url, baselines), tempfile.TemporaryDirectory() as folder:
        raw = baselines["raw"](url, "bench:raw-commit", time.time() + 3.0) / 3.0
        row: dict[str, object] = {"engine": engine, "raw_commits_per_s": round(raw, 1)}
        # One worker runs the turns, the other the handler: every delivery crosses processes, as the issue asks.
        workers = start_workers("bench.events_app:app", url, 1, only=("emitter",))
        workers += start_workers("bench.events_app:app", url, 1, only=("clock",))
        try:
            # Unmeasured warm-up at the same rate: connection pools grow and server backends warm up on first use,
            # which would otherwise decide the p99 of a short run.
            asyncio.run(fixed_rate(url, Path(folder) / "warm-up.txt", args.rate, args.warm_up_s, tag="warm"))
            ledger = Path(folder) / "rate.txt"
            asyncio.run(fixed_rate(url, ledger, args.rate, args.seconds))
            deliveries = read_ledger(ledger)
            crossed = [latency for latency, other, _ in deliveries if other]
            row["rate_per_s"] = args.rate
            row["deliveries"] = len(deliveries)
            row["cross_process"] = len(crossed)
            row["cross_p50_ms"], row["cross_p99_ms"] = percentiles(crossed)
            row["all_p50_ms"], row["all_p99_ms"] = percentiles([latency for latency, _, _ in deliveries])
            rate = asyncio.run(saturation(url, Path(folder) / "burst.txt", args.burst))
            row["events_per_s_saturated"] = round(rate, 1)
            row["saturated_vs_raw"] = round(rate / raw, 3)
        finally:
            stop_workers(workers)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres,redis")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warm-up-s", type=float, default=2.0, help="unmeasured, at the same rate, first")
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/events.json"))
    args = parser.parse_args(argv)
    return run_engines("events", args, run_engine)


if __name__ == "__main__":
    raise SystemExit(main())

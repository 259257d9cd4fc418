"""Benchmark: does a turn cost more as an instance's history, or the backlog of other work, grows?

Two curves per engine, each on a fresh database with one real ``keel worker`` (``--only tick``):

- **history**: one instance's kept history (turn records, state versions, done messages: what retention keeps for a
  day) grows 10 -> 100 -> 1,000 -> 10,000 turns;
- **backlog**: the messages pending for others grow 100 -> 1,000 -> 10,000 -> 100,000: half to instances of a
  workflow no worker here runs (``parked``: ready work of another pool), a quarter as timers due in a day to other
  instances of the measured workflow, a quarter as timers due in a day to the measured instance itself.

The fill is not measured: history by one message that makes the instance send itself the next one in each commit
(a chain), the backlog by the public client's ``send`` (many at once). At each size, measured on the instance:

- **send -> commit**: ``--samples`` messages one after the other (``--idle-s`` apart, so the worker is idle and
  must be woken), from just before ``send`` to the commit as the turn record says it (start + duration), so the
  client's polling in ``wait`` does not blur it; median and p99;
- **closed loop**: ``--loops`` times, one message starting a chain of ``--chain`` turns on the instance, each sending
  the next in its commit, so a new turn starts only once the last committed and no client is in the loop; turns/s
  from the first turn's start to the last commit (the median of the loops), and the median and p99 of the time
  between consecutive commits (over all loops).

Each size is measured against a control, back to back, sample for sample: a second database (on Redis, a second key
prefix) with its own worker, that does not grow (an instance of the smallest history, or the smallest backlog), so
that the machine's load, which moves every figure here by tens of percent within a minute, hits both alike. Every
figure is given as a ratio to the smallest size's in the same run (``_x``), and as that ratio over the control's
(``_xc``): what growing did, with the machine's drift taken out. The history curve measures a fresh
instance per size, ``h{SIZE}``, filled to exactly that size (the earlier sizes' instances stay, so the database's
whole history grows too); the backlog curve measures one instance, ``measured``, whose own timers are part of the
backlog. Measuring adds ``--samples + --loops * --chain`` turns to the measured instance.

Run: ``python -m bench.growth [--engines sqlite,postgres,redis] [--curves history,backlog]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import statistics
import time
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import engines
from bench.growth_app import Tick, app
from bench.workers import run_engines, start_workers, stop_workers

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

    from keel.client import Client

#: The measured instance of the backlog curve; the history curve measures instance ``h{SIZE}`` at each size.
MEASURED = "measured"

#: How far in the future the backlog's timers fall due: never during a run.
TIMER_DELAY_S = 24 * 3600.0


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


async def _count(client: Client, workflow_id: str) -> int:
    """How many turns the instance has committed (its state counts them)."""
    state = await client.state("tick", workflow_id)
    return 0 if state is None else int(state.value.count)


async def _until_count(client: Client, workflow_id: str, target: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await _count(client, workflow_id) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"{workflow_id}: {await _count(client, workflow_id)} of {target} turns in {timeout_s}s")
        await asyncio.sleep(0.05)


async def _bounded(calls: Sequence[Callable[[], Awaitable[object]]], concurrency: int) -> None:
    """Run the calls, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one(call) for call in calls))


async def fill_history(client: Client, workflow_id: str, target: int) -> None:
    """Bring an instance to ``target`` committed turns with one self-sending chain."""
    have = await _count(client, workflow_id)
    if target > have:
        await client.send("tick", workflow_id, Tick(chain=target - have - 1))
        await _until_count(client, workflow_id, target, timeout_s=600)


class Backlog:
    """The pending messages of others, grown in steps: what has been sent so far of each kind."""

    def __init__(self) -> None:
        self.parked = self.timers_elsewhere = self.timers_here = 0

    async def grow_to(self, client: Client, size: int, concurrency: int) -> None:
        half, quarter = size // 2, size // 4
        sends = [("parked", f"parked-{n}", n, 0.0) for n in range(self.parked, half)]
        sends += [("tick", f"timer-{n}", n, TIMER_DELAY_S) for n in range(self.timers_elsewhere, quarter)]
        sends += [("tick", MEASURED, n, TIMER_DELAY_S) for n in range(self.timers_here, size - half - quarter)]
        calls = [partial(client.send, workflow, wid, Tick(n=n), delay_s=delay) for workflow, wid, n, delay in sends]
        await _bounded(calls, concurrency)
        self.parked, self.timers_elsewhere, self.timers_here = half, quarter, size - half - quarter


async def send_to_commit(client: Client, workflow_id: str, samples: int, idle_s: float) -> list[float]:
    """Milliseconds from before each send to its turn's commit, one message at a time."""
    result = []
    for _ in range(samples):
        await asyncio.sleep(idle_s)  # the worker goes idle and must be woken
        sent_at = time.time()
        message_id = await client.send("tick", workflow_id, Tick())
        await client.wait("tick", workflow_id, message_id, timeout_s=60)
        [turn] = await client.turns("tick", workflow_id, limit=1)
        if turn.message_id != message_id:
            raise SystemExit(f"the newest turn of {workflow_id} ran {turn.message_id}, not {message_id}")
        committed_at = (turn.started_at + timedelta(seconds=turn.duration_s)).timestamp()
        result.append((committed_at - sent_at) * 1000)
    return result


async def closed_loop(client: Client, workflow_id: str, turns: int) -> tuple[float, list[float]]:
    """Run a chain of ``turns`` on an instance; its turns/s and the milliseconds between its commits."""
    have = await _count(client, workflow_id)
    await client.send("tick", workflow_id, Tick(chain=turns - 1))
    await _until_count(client, workflow_id, have + turns, timeout_s=120)
    records = await client.turns("tick", workflow_id, limit=turns)
    starts = [r.started_at.timestamp() for r in records]
    commits = sorted(r.started_at.timestamp() + r.duration_s for r in records)
    rate = turns / (commits[-1] - min(starts))
    return rate, [(b - a) * 1000 for a, b in itertools.pairwise(commits)]


def _p99(sample: list[float]) -> float:
    return statistics.quantiles(sample, n=100)[98] if len(sample) > 1 else sample[0]


def _summary(latency: list[float], rates: list[float], gaps: list[float]) -> dict[str, float]:
    return {
        "send_commit_p50_ms": round(statistics.median(latency), 2),
        "send_commit_p99_ms": round(_p99(latency), 2),
        "loop_turns_per_s": round(statistics.median(rates), 1),
        "loop_gap_p50_ms": round(statistics.median(gaps), 2),
        "loop_gap_p99_ms": round(_p99(gaps), 2),
    }


async def measure(sides: list[tuple[Client, str]], args: argparse.Namespace) -> list[dict[str, float]]:
    """Measure each (client, instance), taking their samples in turn, so that the machine's load hits all alike."""
    latency: list[list[float]] = [[] for _ in sides]
    rates: list[list[float]] = [[] for _ in sides]
    gaps: list[list[float]] = [[] for _ in sides]
    for _ in range(args.samples):
        for n, (client, workflow_id) in enumerate(sides):
            latency[n] += await send_to_commit(client, workflow_id, 1, args.idle_s)
    for _ in range(args.loops):
        for n, (client, workflow_id) in enumerate(sides):
            rate, between = await closed_loop(client, workflow_id, args.chain)
            rates[n].append(rate)
            gaps[n] += between
    return [_summary(latency[n], rates[n], gaps[n]) for n in range(len(sides))]


def _with_ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each figure's ratio to the smallest size's (``*_x``), and that ratio over the control's (``*_xc``)."""
    first = points[0]
    for point in points:
        for name in [k for k in point if k.endswith(("_ms", "_per_s"))]:
            point[f"{name}_x"] = round(point[name] / first[name], 2)
            against = (point[name] / point["control"][name]) / (first[name] / first["control"][name])
            point[f"{name}_xc"] = round(against, 2)
    return points


async def curve(urls: tuple[str, str], kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Grow the history or the backlog size by size on the first URL, measuring at each against the second's."""
    grown_backlog = Backlog()
    points = []
    async with app.client(url=urls[0]) as grown, app.client(url=urls[1]) as control:
        sizes = args.history if kind == "history" else args.backlog
        if kind == "backlog":
            await Backlog().grow_to(control, sizes[0], args.fill_concurrency)
            await fill_history(control, MEASURED, 1)
        for size in sizes:
            started = time.perf_counter()
            if kind == "history":
                # Fresh instances per size, so that each starts at exactly its size; the control's stays small.
                measured, steady = f"h{size}", f"h{sizes[0]}-{size}"
                await fill_history(grown, measured, size)
                await fill_history(control, steady, sizes[0])
            else:
                measured = steady = MEASURED
                await grown_backlog.grow_to(grown, size, args.fill_concurrency)
                await fill_history(grown, measured, 1)  # it has a committed state before the first sample
            filled_s = time.perf_counter() - started
            await asyncio.sleep(args.settle_s)
            figures, steady_figures = await measure([(grown, measured), (control, steady)], args)
            point = {"size": size, "fill_s": round(filled_s, 1), **figures, "control": steady_figures}
            print(f"  {kind} {size}: {point}", flush=True)
            points.append(point)
    return _with_ratios(points)


@contextlib.contextmanager
def _two_places(engine: str) -> Iterator[tuple[str, str]]:
    """Two fresh places on ``engine``: the one that grows, and the control (on Redis, one DB, two key prefixes)."""
    with engines.prepared(engine) as (url, _):
        if engine == "redis":
            yield url, f"{url}?prefix=keel-control:"
        else:
            with engines.prepared(engine) as (control, _):
                yield url, control


def run_engine(engine: str, args: argparse.Namespace) -> dict[str, object]:
    row: dict[str, object] = {"engine": engine}
    for kind in args.curves.split(","):
        with _two_places(engine) as urls:
            workers = [start_workers("bench.growth_app:app", url, 1, only=("tick",)) for url in urls]
            try:
                row[kind] = asyncio.run(curve(urls, kind, args))
            finally:
                for started in workers:
                    stop_workers(started)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres,redis")
    parser.add_argument("--curves", default="history,backlog")
    parser.add_argument("--history", type=_ints, default=[10, 100, 1000, 10000], help="turns, comma-separated")
    parser.add_argument("--backlog", type=_ints, default=[100, 1000, 10000, 100000], help="messages")
    parser.add_argument("--samples", type=int, default=40, help="send -> commit samples at each size")
    parser.add_argument("--idle-s", type=float, default=0.02, help="pause before each send -> commit sample")
    parser.add_argument("--chain", type=int, default=200, help="turns of each closed loop")
    parser.add_argument("--loops", type=int, default=3, help="closed loops at each size (turns/s: their median)")
    parser.add_argument("--settle-s", type=float, default=1.0, help="pause between a fill and its measurement")
    parser.add_argument("--fill-concurrency", type=int, default=32, help="sends in flight while filling")
    parser.add_argument("--out", type=Path, default=Path("bench/results/growth.json"))
    args = parser.parse_args(argv)
    # The benchmark's Redis keeps nothing on disk; its warning per connection would drown the figures.
    logging.getLogger("keel.backends.redis").setLevel(logging.ERROR)
    return run_engines("growth", args, run_engine)


if __name__ == "__main__":
    raise SystemExit(main())

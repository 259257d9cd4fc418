"""The caller's side of one measurement, the same for keel and every peer: loops, clocks and the pipe protocol.

Standard library only: this module is imported by keel's side in the project's environment and by each peer's side
in that peer's own virtual environment (which has no keel).

A side is a process (``python -m bench.peers.<name>_side CONFIG_JSON``) that opens its framework on a fresh
database, runs a few unmeasured workflows, then talks to the bench over its standard streams, one JSON object a
line, so that the bench can read the CPU of the workers and of the database server right around the measured part:

    side  -> {"ready": true, "versions": {...}, "settings": {...}}
    bench -> go
    side  -> {"result": {...}}
    bench -> done          (the side closes its framework and exits)

Every workflow is the same: three no-op steps, each step's result durable before the next starts, on a fresh
instance (a new workflow id or thread id every time).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractAsyncContextManager

#: Steps in the workflow every side runs.
STEPS_PER_WORKFLOW = 3

_to_bench: TextIO = sys.stdout


class Caller(Protocol):
    """How a side starts one workflow on a fresh instance and waits for its result."""

    #: The packages that matter and their versions, for the report.
    versions: dict[str, str]
    #: Durability and other settings the side checked or chose, for the report.
    settings: dict[str, Any]

    async def send(self, n: int) -> Any:
        """Start workflow number ``n`` (a fresh instance); return what ``wait`` needs."""

    async def wait(self, sent: Any) -> None:
        """Return once the workflow ``sent`` has finished, all its steps durable."""

    async def call(self, n: int) -> None:
        """Start workflow ``n`` and wait for it: ``send`` then ``wait``, or the framework's own direct call."""

    async def check(self, n: int) -> int:
        """Read back how many steps workflow ``n`` recorded (after the clock stopped): proof the work was done."""


async def closed_loop(caller: Caller, *, callers: int, seconds: float, first: int) -> dict[str, Any]:
    """``callers`` tasks, each calling one workflow after another, for ``seconds``; the clock stops at the last."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    counter = iter(range(first, first + 10**9))

    async def one_caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await caller.call(next(counter))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one_caller() for _ in range(callers)))
    return _result(latencies, time.perf_counter() - started)


async def open_loop(caller: Caller, *, count: int, first: int) -> dict[str, Any]:
    """Send ``count`` workflows at once, then wait for every result; the clock runs from the first send to the last."""
    started = time.perf_counter()
    sent_at = [0.0] * count
    latencies = [0.0] * count

    async def send(i: int) -> Any:
        sent_at[i] = time.perf_counter()
        return await caller.send(first + i)

    async def wait(i: int, sent: Any) -> None:
        await caller.wait(sent)
        latencies[i] = time.perf_counter() - sent_at[i]

    handles = await asyncio.gather(*(send(i) for i in range(count)))
    await asyncio.gather(*(wait(i, handle) for i, handle in enumerate(handles)))
    return _result(latencies, time.perf_counter() - started)


def _result(latencies: list[float], seconds: float) -> dict[str, Any]:
    workflows = len(latencies)
    cuts = statistics.quantiles(latencies, n=100) if workflows > 1 else latencies * 99
    return {
        "workflows": workflows,
        "steps": workflows * STEPS_PER_WORKFLOW,
        "seconds": seconds,
        "steps_per_s": workflows * STEPS_PER_WORKFLOW / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": cuts[98] * 1000,
    }


def main(open_caller: Callable[[dict[str, Any]], AbstractAsyncContextManager[Caller]]) -> None:
    """Run one measurement as the config in ``sys.argv[1]`` says, talking to the bench over stdin and stdout."""
    config = json.loads(sys.argv[1])
    # The pipe to the bench is the real stdout alone: whatever a framework prints goes to stderr instead.
    global _to_bench
    _to_bench = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    asyncio.run(_serve(config, open_caller))


async def _serve(
    config: dict[str, Any], open_caller: Callable[[dict[str, Any]], AbstractAsyncContextManager[Caller]]
) -> None:
    async with open_caller(config) as caller:
        for n in range(config["warm_up"]):  # first connections, prepared statements, imports on first use
            await caller.call(-1 - n)
        _say({"ready": True, "versions": caller.versions, "settings": caller.settings})
        await _expect("go")
        first = config.get("first", 0)  # workflow numbers (and so instance ids) start here
        cpu_started = time.process_time()
        if config["scenario"] == "closed":
            result = await closed_loop(caller, callers=config["callers"], seconds=config["seconds"], first=first)
        else:
            result = await open_loop(caller, count=config["count"], first=first)
        result["cpu_s"] = time.process_time() - cpu_started
        result["steps_recorded_by_first_workflow"] = await caller.check(first)
        _say({"result": result})
        await _expect("done")


def _say(message: dict[str, Any]) -> None:
    _to_bench.write(json.dumps(message) + "\n")
    _to_bench.flush()


async def _expect(word: str) -> None:
    line = (await asyncio.to_thread(sys.stdin.readline)).strip()
    if line != word:
        raise SystemExit(f"expected {word!r} from the bench, got {line!r}")

"""Run an update loop in several processes for a fixed time and count what they got done.

Every loop, keel's or a raw driver's, is a function ``loop(url, key, stop_at) -> int`` run in fresh
``spawn`` processes that start together behind a barrier, so that keel and its baseline are measured the
same way, in the same run, on the same machine.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.synchronize import Barrier


@dataclass(frozen=True)
class Measurement:
    """Updates per second of one loop in one scenario."""

    engine: str
    impl: str
    processes: int
    keys: str
    updates: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.updates / self.seconds


def _child(
    loop: Callable[[str, str, float], int], url: str, key: str, seconds: float, barrier: Barrier, out: mp.Queue[int]
) -> None:
    barrier.wait()
    stop_at = time.time() + seconds
    out.put(loop(url, key, stop_at))


def measure(
    loop: Callable[[str, str, float], int], *, url: str, processes: int, hot: bool, seconds: float, tag: str
) -> int:
    """Run ``loop`` in ``processes`` processes for ``seconds``; return the updates they completed."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes)
    out: mp.Queue[int] = ctx.Queue()
    children = [
        ctx.Process(
            target=_child,
            args=(loop, url, f"bench:{tag}:hot" if hot else f"bench:{tag}:{i}", seconds, barrier, out),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    results: list[int] = []
    deadline = time.monotonic() + seconds + 120
    while len(results) < processes:
        try:
            results.append(out.get(timeout=0.5))
        except queue.Empty:
            if any(c.exitcode not in (None, 0) for c in children) or time.monotonic() > deadline:
                for child in children:
                    child.kill()
                raise RuntimeError(f"a benchmark process failed ({tag}); its traceback is above") from None
    for child in children:
        child.join(timeout=30)
    return sum(results)

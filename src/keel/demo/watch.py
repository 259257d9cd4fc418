"""How the parent follows the demo processes: a progress bar per way, fed by shared counters and a queue."""

from __future__ import annotations

import asyncio
import queue
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

import keel
from keel.demo.ways import LABELS, WAYS, ChildReport, Shared, Way

if TYPE_CHECKING:
    from collections.abc import Iterator
    from multiprocessing.context import SpawnProcess

    from rich.console import Console

#: How often the parent redraws the progress and checks on the processes.
POLL_INTERVAL_S = 0.1

#: Give up when no process has made progress for this long (a backend that stopped answering).
STALL_TIMEOUT_S = 120.0


class DemoError(keel.KeelError):
    """Raised when the demo cannot run to the end: a process failed, or the keys are in use."""

    code = keel.ErrorCode.demo_failed


@contextmanager
def progress_display(console: Console) -> Iterator[Progress]:
    """Show one progress line per way on ``console`` for the duration of a ``with`` block."""
    # Without a terminal rich draws nothing live and prints the final bars once, when the block ends.
    progress = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(bar_width=12),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        yield progress


class Watcher:
    """Follows the processes through the ways: progress from shared counters, results from the queue."""

    def __init__(self, shared: Shared, processes: list[SpawnProcess], progress: Progress, updates: int) -> None:
        self.shared = shared
        self.processes = processes
        self.progress = progress
        self.total = len(processes) * updates
        self.reports: dict[Way, list[ChildReport]] = defaultdict(list)
        self.tasks: dict[Way, TaskID] = {
            way: progress.add_task(LABELS[way], total=self.total, start=False, note="waiting") for way in WAYS
        }

    def attempted(self, way: Way) -> int:
        """Updates attempted so far in ``way``, all processes together."""
        n = len(self.processes)
        start = WAYS.index(way) * n
        return int(sum(self.shared.attempted[start : start + n]))

    async def follow(self, way: Way) -> list[ChildReport]:
        """Show the progress of ``way`` until every process has reported it; return the reports by process."""
        task = self.tasks[way]
        self.progress.start_task(task)
        last_count, last_change = -1, time.monotonic()
        while len(self.reports[way]) < len(self.processes):
            await asyncio.sleep(POLL_INTERVAL_S)
            self._drain()
            count = self.attempted(way)
            self.progress.update(task, completed=count, note=self._note(way))
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT_S:
                raise DemoError(f"no progress for {STALL_TIMEOUT_S:g} s: is the backend still answering?")
            await self._check_alive()
        return sorted(self.reports[way], key=lambda r: r.index)

    def finish(self, way: Way, note: str) -> None:
        """Stop the clock of ``way`` and show its outcome on its line."""
        self.progress.update(self.tasks[way], completed=self.attempted(way), note=note)
        self.progress.stop_task(self.tasks[way])

    def _note(self, way: Way) -> str:
        note = f"{self.attempted(way):,}/{self.total:,}"
        if way is Way.keel_update:
            note += f", {int(sum(self.shared.retried)):,} retried"
        return note

    def _drain(self) -> None:
        while True:
            try:
                report = self.shared.reports.get_nowait()
            except queue.Empty:
                return
            if report.error is not None:
                raise DemoError(report.error)
            if report.way is not None:
                self.reports[report.way].append(report)

    async def _check_alive(self) -> None:
        dead = [(i, p.exitcode) for i, p in enumerate(self.processes) if p.exitcode not in (None, 0)]
        if not dead:
            return
        # The process that failed first may still be sending its reason: give it a moment, and prefer it.
        await asyncio.sleep(0.5)
        self._drain()
        index, code = dead[0]
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        raise DemoError(f"process #{index + 1} {how}")

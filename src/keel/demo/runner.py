"""The parent side of ``keel demo``: claim the keys, start the processes, watch them, collect the results.

The parent spawns the processes once; each runs the three ways in turn (``keel.demo.ways``). The
parent follows one way at a time, drawing a progress bar from the counters the processes keep in
shared memory, then reads what a reader would see: one replica's copy, or the shared record.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import keel
from keel.demo.report import Verdict, WayResult, show_results, verdict
from keel.demo.watch import DemoError, Watcher, progress_display
from keel.demo.ways import WAYS, ChildPlan, Shared, Way, child_main

if TYPE_CHECKING:
    from collections.abc import Iterator
    from multiprocessing.context import SpawnProcess

    from rich.console import Console


#: How long a finished process may take to exit before it is terminated.
EXIT_TIMEOUT_S = 10.0

#: The same, after a failure: the others have been told to stop and should be quick about it.
FAILED_EXIT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DemoSettings:
    """What to race, and where."""

    processes: int
    updates: int
    #: Any keel URL; None races on a fresh SQLite file in a temporary folder, removed afterwards.
    url: str | None = None
    #: The prefix of the keys used; None picks a fresh random one.
    key: str | None = None


@dataclass(frozen=True)
class DemoReport:
    """What a run found."""

    url: str
    results: list[WayResult]
    verdict: Verdict


def run_demo(settings: DemoSettings, console: Console) -> DemoReport:
    """Race ``settings.processes`` real processes three ways, showing progress and then the results.

    Args:
        settings: The number of processes and updates, the backend and the key.
        console: Where progress, results and the explanation go.

    Returns:
        The results and the verdict.

    Raises:
        ConfigurationError: The URL cannot be used (unknown scheme, missing extra, bad option).
        InvalidKeyError: The key is not usable.
        BackendUnavailable: The backend cannot be reached.
        DemoError: A process failed, or the keys already hold values.
    """
    if settings.url is not None and settings.url.lower().startswith("memory:"):
        raise keel.ConfigurationError(
            "memory:// lives inside one process, and the demo races several: use sqlite://, postgresql:// or redis://"
        )
    with _backend_url(settings.url) as url:
        return asyncio.run(_run(settings, url, console, temporary=settings.url is None))


@contextmanager
def _backend_url(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="keel-demo-") as folder:
        # A throwaway file: durability buys nothing here, and an fsync per commit would slow the race down.
        yield f"sqlite:///{Path(folder) / 'demo.db'}?synchronous=NORMAL"


def _demo_keys(prefix: str | None) -> dict[Way, str]:
    """Return the keys of the two ways that share a record; a fresh random prefix when None."""
    prefix = prefix or f"keel-demo:{uuid.uuid4().hex[:12]}"
    return {Way.get_then_set: f"{prefix}:get-then-set", Way.keel_update: f"{prefix}:update"}


async def _run(settings: DemoSettings, url: str, console: Console, *, temporary: bool) -> DemoReport:
    # history_limit=0: the demo's keys are scratch counters, and keeping their versions would only leave litter.
    async with keel.open_store(url, history_limit=0) as store:
        keys = _demo_keys(settings.key)
        await _claim(store, keys)
        where = f"{store.url} (a temporary file, removed afterwards)" if temporary else store.url
        console.print(
            f"Racing [bold]{settings.processes}[/] processes x [bold]{settings.updates:,}[/] updates of one shared "
            f"counter, three ways.\nBackend: {where}\n"
        )
        try:
            results = await _race(settings, url, keys, store, console)
        finally:
            await _release(store, keys)
    show_results(console, results, settings.processes, settings.updates)
    return DemoReport(url=url, results=results, verdict=verdict(results))


async def _claim(store: keel.Store, keys: dict[Way, str]) -> None:
    """Create each key at 0; refuse keys that hold a value, so two runs never share a counter."""
    claimed: dict[Way, str] = {}
    for way, key in keys.items():
        try:
            await store.put(key, 0, expected_version=None)
        except keel.StaleWriteError:
            await _release(store, claimed)
            raise DemoError(
                f"key {key!r} already holds a value on {store.url}: is another demo running with the same --key? "
                "Pick another --key, or leave it out to use a fresh random one."
            ) from None
        claimed[way] = key


async def _release(store: keel.Store, keys: dict[Way, str]) -> None:
    """Delete the demo's keys, so that repeated runs on a shared backend start from nothing."""
    for key in keys.values():
        current = await store.get(key)
        if current is not None:
            await store.delete(key, expected_version=current.version)


async def _race(
    settings: DemoSettings, url: str, keys: dict[Way, str], store: keel.Store, console: Console
) -> list[WayResult]:
    context = multiprocessing.get_context("spawn")
    n = settings.processes
    shared = Shared(
        attempted=context.RawArray(ctypes.c_longlong, n * len(WAYS)),
        retried=context.RawArray(ctypes.c_longlong, n),
        barrier=context.Barrier(n),
        reports=context.Queue(),
    )
    processes = [
        context.Process(
            target=child_main,
            args=(ChildPlan(i, n, url, keys, settings.updates), shared),
            name=f"keel-demo-{i + 1}",
            daemon=True,
        )
        for i in range(n)
    ]
    for process in processes:
        process.start()
    try:
        with progress_display(console) as progress:
            watcher = Watcher(shared, processes, progress, settings.updates)
            results = [await _follow(watcher, way, keys.get(way), store) for way in WAYS]
    except BaseException:
        shared.barrier.abort()  # release the processes still waiting for the others
        await _stop(processes, timeout_s=FAILED_EXIT_TIMEOUT_S)
        raise
    await _stop(processes, timeout_s=EXIT_TIMEOUT_S)
    return results


async def _follow(watcher: Watcher, way: Way, key: str | None, store: keel.Store) -> WayResult:
    """Follow ``way`` to its end, then read what a reader sees: one replica's copy, or the shared ``key``."""
    reports = await watcher.follow(way)
    attempted = watcher.attempted(way)
    if key is None:
        # A reader's request lands on one replica and sees that replica's copy: here, replica #1's.
        result = WayResult(way, applied=reports[0].copy, attempted=attempted)
    else:
        final = await store.get(key)
        applied = 0 if final is None else int(final.value)
        retried = sum(r.retried for r in reports) if way is Way.keel_update else None
        result = WayResult(way, applied=applied, attempted=attempted, retried=retried)
    watcher.finish(way, result.summary)
    return result


async def _stop(processes: list[SpawnProcess], *, timeout_s: float) -> None:
    """Wait for the processes to exit; terminate (SIGTERM) those still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            await asyncio.to_thread(process.join)

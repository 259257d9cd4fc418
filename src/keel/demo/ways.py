"""The three ways of keeping a shared counter, as each demo process runs them.

This module is the child side of ``keel demo``: ``child_main`` is the target of every spawned process.
Each process runs the three ways one after the other, counting its attempts in shared memory (the
parent draws its progress from them) and sending one ``ChildReport`` per way through a queue.

The two ways that share a record are forced into the race the article describes, every time rather
than by luck of scheduling: in each round every process reads before any process writes (a barrier
between the read and the write), and every write of a round lands before the next round reads (a
second barrier). keel's way runs under the very same schedule.
"""

from __future__ import annotations

import asyncio
import enum
import multiprocessing
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import keel

if TYPE_CHECKING:
    import ctypes
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

#: How long a process waits for the others at a barrier before deciding one of them is stuck or dead.
BARRIER_TIMEOUT_S = 60.0

#: How long ``update()`` may keep retrying; generous, since conflicts are forced on purpose here.
UPDATE_DEADLINE_S = 60.0


class Way(enum.StrEnum):
    """The ways of counting, in the order the demo runs them."""

    in_memory = "in_memory"
    get_then_set = "get_then_set"
    keel_update = "keel_update"


#: What the tables call each way.
LABELS = {
    Way.in_memory: "in-memory copy per replica",
    Way.get_then_set: "shared record, get then set",
    Way.keel_update: "keel store.update",
}

WAYS = tuple(Way)


@dataclass(frozen=True)
class Shared:
    """What the parent shares with every child: counters in shared memory, a barrier, a queue."""

    #: Attempts so far, one slot per (way, process): ``attempted[way_index * processes + index]``.
    attempted: ctypes.Array[ctypes.c_longlong]
    #: Extra runs of the update function so far (conflicts retried), one slot per process.
    retried: ctypes.Array[ctypes.c_longlong]
    barrier: Barrier
    reports: Queue[ChildReport]


@dataclass(frozen=True)
class ChildPlan:
    """What one child process does."""

    index: int
    processes: int
    url: str
    keys: dict[Way, str]
    updates: int


@dataclass(frozen=True)
class ChildReport:
    """What a child sends back after each way, or when it fails."""

    index: int
    way: Way | None
    #: The value this process's in-memory copy ended at (in-memory way only).
    copy: int = 0
    #: How many times the update function ran beyond one per update (keel way only).
    retried: int = 0
    error: str | None = None


def child_main(plan: ChildPlan, shared: Shared) -> None:
    """Run the three ways in this process and report each; the entry point of a spawned demo process."""
    # The parent owns shutdown: on Ctrl-C it stops the children itself, without a traceback from each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_run_ways(plan, shared))
    except threading.BrokenBarrierError:
        # Another process failed (and reported why) or the parent gave up: nothing to add.
        sys.exit(1)
    except keel.KeelError as exc:
        _fail(plan, shared, str(exc))
    except Exception as exc:
        _fail(plan, shared, f"{type(exc).__name__}: {exc}", exit_now=False)
        raise


def _fail(plan: ChildPlan, shared: Shared, message: str, *, exit_now: bool = True) -> None:
    shared.reports.put(ChildReport(plan.index, None, error=f"process #{plan.index + 1}: {message}"))
    shared.barrier.abort()  # so that the others stop waiting for this one
    if exit_now:
        sys.exit(1)


async def _run_ways(plan: ChildPlan, shared: Shared) -> None:
    shared.reports.put(ChildReport(plan.index, Way.in_memory, copy=_in_memory(plan, shared)))
    async with keel.open_store(plan.url, history_limit=0, update_deadline_s=UPDATE_DEADLINE_S) as store:
        await _get_then_set(store, plan, shared)
        shared.reports.put(ChildReport(plan.index, Way.get_then_set))
        retried = await _keel_update(store, plan, shared)
        shared.reports.put(ChildReport(plan.index, Way.keel_update, retried=retried))


def _count_attempt(plan: ChildPlan, shared: Shared, way: Way) -> None:
    # One writer per slot (this process), so the shared memory needs no lock.
    shared.attempted[WAYS.index(way) * plan.processes + plan.index] += 1


class ReplicaWorkflow:
    """The article's broken ``LoanWorkflow``: its state lives in this process's memory."""

    def __init__(self) -> None:
        self.state = {"step": 0}

    def run(self) -> None:
        """Take one step; no other replica will ever see it."""
        self.state["step"] += 1


def _in_memory(plan: ChildPlan, shared: Shared) -> int:
    workflow = ReplicaWorkflow()
    for _ in range(plan.updates):
        workflow.run()
        _count_attempt(plan, shared, Way.in_memory)
    return workflow.state["step"]


async def _wait_for_all(barrier: Barrier) -> None:
    # A parent killed without a chance to stop its children must not leave them racing on their own.
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        barrier.abort()  # and release the others, waiting for this one
        raise threading.BrokenBarrierError
    # On a thread: the event loop stays free for the backend's connection while this process waits.
    await asyncio.to_thread(barrier.wait, BARRIER_TIMEOUT_S)


async def naive_set(store: keel.Store, key: str, value: int) -> None:
    """The article's ``store.set(id, value)``: overwrite whatever is there, last writer wins.

    keel has no blind write on purpose (``put`` requires ``expected_version``), so this emulates one:
    re-read the version right before writing and write on top of it, again if another process slipped
    in between. Whatever the others wrote meanwhile is overwritten, exactly as a plain ``set`` would.
    """
    while True:
        current = await store.get(key)
        try:
            await store.put(key, value, expected_version=None if current is None else current.version)
        except keel.StaleWriteError:
            continue
        return


async def _get_then_set(store: keel.Store, plan: ChildPlan, shared: Shared) -> None:
    key = plan.keys[Way.get_then_set]
    for _ in range(plan.updates):
        current = await store.get(key)
        await _wait_for_all(shared.barrier)  # every process has read this round's value before any writes
        await naive_set(store, key, (0 if current is None else current.value) + 1)
        _count_attempt(plan, shared, Way.get_then_set)
        await _wait_for_all(shared.barrier)  # this round's writes have all landed before the next round reads


class _AddOne:
    """The update function of keel's way, run under the same forced schedule as get-then-set.

    ``update()`` reads, calls this, then writes with a compare-and-swap. The first call of each update
    waits until every process has read, so all of them compute from the same version and all but one
    write must be refused and retried: conflicts happen in every round, not by chance.
    """

    def __init__(self, barrier: Barrier) -> None:
        self.barrier = barrier
        self.runs = 0
        self.first_of_update = True

    async def __call__(self, n: int) -> int:
        self.runs += 1
        if self.first_of_update:
            self.first_of_update = False
            await _wait_for_all(self.barrier)
        return n + 1


async def _keel_update(store: keel.Store, plan: ChildPlan, shared: Shared) -> int:
    key = plan.keys[Way.keel_update]
    add_one = _AddOne(shared.barrier)
    for done in range(1, plan.updates + 1):
        add_one.first_of_update = True
        await store.update(key, add_one, default=0)
        _count_attempt(plan, shared, Way.keel_update)
        shared.retried[plan.index] = add_one.runs - done
        await _wait_for_all(shared.barrier)  # as in get-then-set: the next round starts from one value
    return add_one.runs - plan.updates

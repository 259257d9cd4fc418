"""The worker: claims the next turn of any instance of its app, runs it, and commits it, under a lease.

Handler deliveries are claimed and run the same way: each is the one message of an instance ``on/HANDLER`` /
``EVENT_ID``, so any worker whose app registers the handler runs it, under a lease, and commits its
acknowledgement with its sends and publishes (G5).

Map of the design:

- Claiming: ``backend.claim`` leases instances that have a pending message and no live lease, raising each
  one's fencing token. At most ``concurrency`` turns run at once, each of a different instance, so one
  instance's turns run one at a time and in send order (G2) while different instances run in parallel.
- Idle: when there is nothing to claim the worker waits on ``backend.wait_for_work`` (LISTEN/NOTIFY on
  PostgreSQL, a blocking read on Redis, a short poll on SQLite), for a turn to finish, or for shutdown.
- Heartbeat: a task on the worker's own event loop renews every held lease each third of ``lease_s``. A wedged
  loop stops renewing, so its leases expire and another worker takes over (G4). A renewal that finds a lease
  lost cancels that turn: its result could never be committed.
- Turns: ``keel.turn.TurnRunner`` runs each claimed turn and commits it (G3), retries it after a backoff, or
  dead-letters it (which pauses its instance); the backend refuses any of these under a stale token or an
  expired lease.
- Load: a backend that answers but had no connection free in time (``BackendOverloaded``) makes the worker back
  off and go on, logged once per episode (``keel.load``); an unreachable one (``BackendUnavailable``) is logged as
  an error at each failure. Neither ends the worker.
- Shutdown: stop claiming, let running turns finish within ``grace_s``, cancel the rest and release their
  leases so another worker can take them at once.

Every log record about a turn carries workflow, workflow_id, worker, state_version, fencing_token and attempt (G9).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keel.backends import open_backend, scheme_of
from keel.backends.base import Claim, StoreOptions
from keel.errors import BackendOverloaded, BackendUnavailable, ConfigurationError
from keel.identity import process_identity
from keel.load import LoadNotice
from keel.payload import DEFAULT_MAX_VALUE_BYTES
from keel.retention import prune_forever
from keel.turn import TurnRunner, log_fields

if TYPE_CHECKING:
    from keel.app import App
    from keel.backends.base import WorkerBackend

logger = logging.getLogger(__name__)

#: How long a lease lasts unless renewed; another worker takes over a crashed one's instances after this.
DEFAULT_LEASE_S = 10.0

#: How long a stopping worker lets running turns finish before cancelling them.
DEFAULT_GRACE_S = 10.0

#: How many turns one worker runs at once, by default.
DEFAULT_CONCURRENCY = 8

#: The longest an idle worker waits before looking for work again, even without a wake-up: the bound on how late
#: a durable timer or the end of a retry's backoff is noticed, since neither sends a wake-up.
IDLE_POLL_S = 0.5

#: The longest pause after a failed claim (backend unreachable) before the next try.
CLAIM_RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker runs.

    Raises:
        ConfigurationError: A setting is out of range (a worker that could never claim, or never renew).
    """

    concurrency: int = DEFAULT_CONCURRENCY
    lease_s: float = DEFAULT_LEASE_S
    grace_s: float = DEFAULT_GRACE_S
    idle_poll_s: float = IDLE_POLL_S
    max_state_bytes: int = DEFAULT_MAX_VALUE_BYTES
    #: Names of the workflows and handlers this worker runs; empty runs all of the app's. Handlers the worker
    #: does not run still receive the events it publishes: the fan-out follows the app, not the worker.
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.concurrency, int) and self.concurrency >= 1):
            raise ConfigurationError(f"concurrency must be an integer of at least 1, not {self.concurrency!r}")
        for name in ("lease_s", "idle_poll_s"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds, not {getattr(self, name)!r}")
        if not self.grace_s >= 0:
            raise ConfigurationError(f"grace_s must be 0 or more seconds, not {self.grace_s!r}")
        if not (isinstance(self.max_state_bytes, int) and self.max_state_bytes >= 1):
            raise ConfigurationError(f"max_state_bytes must be a positive integer, not {self.max_state_bytes!r}")

    def check_names(self, app: App) -> None:
        """Raise unless every name in ``only`` is one of the app's workflows or handlers.

        Raises:
            ConfigurationError: A name is neither; the error lists the registered ones.
        """
        known = {*app.workflows, *app.handlers}
        unknown = [name for name in self.only if name not in known]
        if unknown:
            raise ConfigurationError(
                f"--only {', '.join(unknown)}: app {app.name!r} has no such workflow or handler; it has "
                f"{', '.join(sorted(known)) or 'none'}"
            )

    def runs(self, name: str) -> bool:
        """True if this worker runs the workflow or handler ``name``."""
        return not self.only or name in self.only


@dataclass
class _Running:
    claim: Claim
    task: asyncio.Task[None]


class Worker:
    """Runs the turns of one app's workflow instances from one backend."""

    def __init__(self, app: App, backend: WorkerBackend, settings: WorkerSettings | None = None) -> None:
        self.app = app
        self.backend = backend
        self.settings = settings or WorkerSettings()
        self.identity = process_identity()
        self._running: dict[str, _Running] = {}
        self._slot_freed = asyncio.Event()
        #: An overloaded backend is load, not an outage: the worker backs off and goes on, saying so once.
        self._load = LoadNotice(logger, self.identity)
        self._turns = TurnRunner(
            app, backend, worker=self.identity, max_state_bytes=self.settings.max_state_bytes, load=self._load
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run turns until ``stop`` is set, then shut down gracefully."""
        self.app.freeze()
        self.settings.check_names(self.app)
        own = sorted(name for name in self.app.workflows if self.settings.runs(name))
        handlers = sorted(
            (spec for spec in self.app.handlers.values() if self.settings.runs(spec.name)), key=lambda s: s.name
        )
        workflows = own + [spec.workflow for spec in handlers]
        logger.info(
            "worker %s started for app %s on %s: workflows %s, handlers %s, concurrency %d, lease %gs",
            self.identity,
            self.app.name,
            self.backend.url,
            ", ".join(own) or "(none)",
            ", ".join(f"{spec.name} ({spec.event_type.__name__})" for spec in handlers) or "(none)",
            self.settings.concurrency,
            self.settings.lease_s,
            extra={"worker": self.identity},
        )
        heartbeat = asyncio.create_task(self._heartbeat(), name="keel-heartbeat")
        pruning = asyncio.create_task(
            prune_forever(self.backend, self.app.name, self.app.retention, self.identity), name="keel-prune"
        )
        try:
            await self._claim_loop(workflows, stop)
        finally:
            await self._drain()
            for task in (heartbeat, pruning):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        logger.info("worker %s stopped", self.identity, extra={"worker": self.identity})

    async def _claim_loop(self, workflows: list[str], stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            free = self.settings.concurrency - len(self._running)
            claims: list[Claim] = []
            if free > 0 and workflows:
                try:
                    claims = await self.backend.claim(
                        self.app.name, workflows, worker=self.identity, lease_s=self.settings.lease_s, limit=free
                    )
                    failures = 0
                    self._load.eased()
                except BackendOverloaded as exc:
                    failures += 1
                    self._load.overloaded("claiming", exc)
                    await _sleep_or_stop(stop, min(CLAIM_RETRY_MAX_S, 0.1 * 2**failures))
                    continue
                except BackendUnavailable as exc:
                    failures += 1
                    logger.error("claiming failed: %s", exc, extra={"worker": self.identity})
                    await _sleep_or_stop(stop, min(CLAIM_RETRY_MAX_S, 0.1 * 2**failures))
                    continue
            for claim in claims:
                self._start(claim)
            if claims and len(claims) == free:
                await self._wait_for_slot_or_stop(stop)
            else:
                # Fewer claims than free slots means nothing else was ready: claiming again at once would find
                # nothing. Every engine's wait returns at once for work sent since the claim began, so none is missed.
                await self._idle(stop)

    def _start(self, claim: Claim) -> None:
        key = _instance_key(claim)
        task = asyncio.create_task(self._run_turn(claim), name=f"keel-turn:{key}")
        self._running[key] = _Running(claim, task)
        task.add_done_callback(lambda _: self._finished(key, task))

    def _finished(self, key: str, task: asyncio.Task[None]) -> None:
        current = self._running.get(key)
        if current is not None and current.task is task:
            del self._running[key]
            if not task.cancelled() and task.exception() is not None:
                # TurnRunner records every failure of user code; this is keel's own (or the backend's), and
                # must not vanish as an unretrieved task exception. The lease expires and another attempt runs.
                logger.error(
                    "turn runner failed; the lease will expire and the turn run again",
                    exc_info=task.exception(),
                    extra=self._extra(current.claim),
                )
        self._slot_freed.set()

    async def _idle(self, stop: asyncio.Event) -> None:
        waits = [
            asyncio.create_task(stop.wait()),
            asyncio.create_task(self._slot_freed.wait()),
            asyncio.create_task(self._wake_up()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            self._slot_freed.clear()

    async def _wake_up(self) -> None:
        try:
            await self.backend.wait_for_work(self.app.name, timeout_s=self.settings.idle_poll_s)
        except BackendOverloaded as exc:
            self._load.overloaded("waiting for work", exc)
            await asyncio.sleep(self.settings.idle_poll_s)
        except BackendUnavailable as exc:
            logger.error("waiting for work failed: %s", exc, extra={"worker": self.identity})
            await asyncio.sleep(self.settings.idle_poll_s)

    async def _wait_for_slot_or_stop(self, stop: asyncio.Event) -> None:
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self._slot_freed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            self._slot_freed.clear()

    async def _run_turn(self, claim: Claim) -> None:
        await self._turns.run(claim)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            running = list(self._running.values())
            if not running:
                continue
            try:
                held = await self.backend.renew([r.claim for r in running], lease_s=self.settings.lease_s)
            except BackendOverloaded as exc:
                self._load.overloaded("renewing leases", exc)
                continue
            except BackendUnavailable as exc:
                logger.error("renewing leases failed: %s", exc, extra={"worker": self.identity})
                continue
            for entry, ok in zip(running, held, strict=True):
                # A run whose outcome is being written released its lease itself (a commit does): not lost.
                if not ok and not entry.task.done() and entry.claim.message_id not in self._turns.settling:
                    logger.warning(
                        "lease lost (expired, or another worker took the instance over): cancelling the turn",
                        extra=self._extra(entry.claim),
                    )
                    entry.task.cancel()

    async def _drain(self) -> None:
        running = list(self._running.values())
        if not running:
            return
        logger.info(
            "stopping: waiting up to %gs for %d running turn(s)",
            self.settings.grace_s,
            len(running),
            extra={"worker": self.identity},
        )
        _, late = await asyncio.wait([r.task for r in running], timeout=self.settings.grace_s)
        for entry in running:
            if entry.task in late:
                entry.task.cancel()
        await asyncio.gather(*(r.task for r in running), return_exceptions=True)
        for entry in running:
            if entry.task in late:
                with contextlib.suppress(BackendUnavailable, BackendOverloaded):
                    await self.backend.release(entry.claim)
                logger.warning("turn cancelled at shutdown; its lease was released", extra=self._extra(entry.claim))

    def _extra(self, claim: Claim) -> dict[str, Any]:
        return log_fields(claim, self.identity)


def _instance_key(claim: Claim) -> str:
    return f"{claim.instance.workflow}/{claim.instance.workflow_id}"


async def _sleep_or_stop(stop: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay_s)


def refuse_unshareable(url: str, *, user: str = "a worker") -> None:
    """Raise if ``url`` is a backend that other processes cannot see (``memory://``).

    Args:
        url: The backend URL.
        user: Who would use it, for the error: a worker, or a command (``keel send``) whose writes would vanish
            when it exits.

    Raises:
        ConfigurationError: The URL is ``memory://``.
    """
    if scheme_of(url) != "memory":
        return
    if user == "a worker":
        why = "so clients in other processes could never reach this worker"
        tests = "run the worker in the test's own process (keel.worker.Worker)"
    else:
        why = "so what it writes would vanish when the command exits, and it could read nothing another process wrote"
        tests = "use keel.testing.WorkflowTester in the test's own process"
    raise ConfigurationError(
        f"{user} cannot use {url}: memory:// lives inside one process, {why}. Use sqlite:///path.db on one "
        f"machine, or postgresql:// or redis:// across machines (check KEEL_URL); for tests, {tests}"
    )


async def serve(
    app: App, url: str, settings: WorkerSettings | None = None, *, stop: asyncio.Event | None = None
) -> None:
    """Run a worker for ``app`` on ``url`` until SIGTERM, SIGINT (Ctrl-C) or ``stop``, then stop gracefully.

    Raises:
        ConfigurationError: ``url`` is ``memory://``, or another unusable URL.
        BackendUnavailable: The backend cannot be reached at start.
    """
    refuse_unshareable(url)
    app.freeze()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backend = await open_backend(url, StoreOptions())
    try:
        await Worker(app, backend, settings).run(stop)
    finally:
        await backend.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

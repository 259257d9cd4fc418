"""Unit-test workflows without a worker process: ``keel.testing.WorkflowTester`` runs them in this process.

    async with keel.testing.WorkflowTester(app) as tester:
        state = await tester.run("loan", "42", LoanRequest(amount=1000))
        assert state.value.step == 1
        await tester.deliver(Decided(loan_id="42", approved=True))  # every handler of Decided has succeeded

The tester uses a private ``memory://`` backend (SQLite in memory: the same engine as the embedded default) and a
real ``keel.worker.Worker`` in the same event loop, so turns go through exactly what production runs: validation,
steps, timeouts, retries, dead letters. While it runs, ``app.client()`` (in the code under test too) opens that same
private backend, never ``./keel.db``; ``tester.client`` is an open one, for ``dead_letters``, ``retry``, ``skip``,
``turns``, ``wait``...
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

from keel.backends import forget_memory, open_backend
from keel.backends.base import StoreOptions
from keel.errors import ConfigurationError
from keel.worker import Worker, WorkerSettings

if TYPE_CHECKING:
    from pydantic import BaseModel

    from keel.app import App
    from keel.backends.base import Backend
    from keel.client import Client
    from keel.events import Event, EventInfo
    from keel.types import Versioned


class WorkflowTester:
    """An app's workflows, a client and an in-process worker on a private in-memory backend.

    Args:
        app: The app under test (it is frozen when the tester starts, as in production).
        concurrency: Turns the in-process worker runs at once.
        lease_s: The worker's lease length.
    """

    def __init__(self, app: App, *, concurrency: int = 4, lease_s: float = 5.0) -> None:
        self.app = app
        self._space = f"keel-testing-{uuid.uuid4().hex}"
        self._settings = WorkerSettings(concurrency=concurrency, lease_s=lease_s, grace_s=1.0, idle_poll_s=0.05)
        self._backend: Backend | None = None
        self._client: Client | None = None
        self._stop = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    @property
    def client(self) -> Client:
        """An open client on the tester's backend, for what ``run`` does not cover.

        That is ``dead_letters``, ``retry``, ``skip``, ``turns``, ``wait``, ``events``... ``app.client()`` opened
        inside the tester reaches the same backend.

        Raises:
            ConfigurationError: The tester is not running (use it inside ``async with``).
        """
        if self._client is None:
            raise ConfigurationError("use the tester inside `async with WorkflowTester(app) as tester:`")
        return self._client

    async def __aenter__(self) -> WorkflowTester:
        url = f"memory://{self._space}"
        self.app.use_testing_backend(url)
        try:
            self._backend = await open_backend(url, StoreOptions())
            self._client = await self.app.client(url=url).__aenter__()
        except BaseException:
            self.app.use_testing_backend(None)
            raise
        self._worker = asyncio.create_task(Worker(self.app, self._backend, self._settings).run(self._stop))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        try:
            if self._worker is not None:
                await self._worker
            if self._client is not None:
                await self._client.aclose()
            if self._backend is not None:
                await self._backend.aclose()
            await forget_memory(f"memory://{self._space}")
        finally:
            self.app.use_testing_backend(None)

    async def run(
        self, workflow: str, workflow_id: str, message: BaseModel | dict[str, Any], *, timeout_s: float = 10.0
    ) -> Versioned[Any]:
        """Send ``message``, wait for its turn to commit, and return the instance's state after it.

        Raises:
            TurnFailedError: The turn failed for good (dead-lettered), with its traceback.
            WaitTimeoutError: It did not commit within ``timeout_s`` (retries may still be waiting).
            UnknownWorkflowError, PayloadValidationError: As ``Client.send``.
        """
        message_id = await self.client.send(workflow, workflow_id, message)
        await self.client.wait(workflow, workflow_id, message_id, timeout_s=timeout_s)
        state = await self.client.state(workflow, workflow_id)
        assert state is not None  # a committed turn always leaves a state
        return state

    async def send(self, workflow: str, workflow_id: str, message: BaseModel | dict[str, Any]) -> str:
        """Send ``message`` without waiting; returns its message id."""
        return await self.client.send(workflow, workflow_id, message)

    async def state(self, workflow: str, workflow_id: str) -> Versioned[Any] | None:
        """The instance's committed state, or None before its first turn."""
        return await self.client.state(workflow, workflow_id)

    async def deliver(self, event: Event, *, timeout_s: float = 10.0) -> str:
        """Publish ``event`` and wait until every handler registered for its type has succeeded; return its id.

        Raises:
            TurnFailedError: A handler failed for good (dead-lettered), with its traceback.
            WaitTimeoutError: Not all handlers succeeded within ``timeout_s`` (retries may still be waiting).
            MessageNotFoundError: No handler is registered for the event's type.
        """
        event_id = await self.client.publish(event)
        await self.client.wait_event(event_id, timeout_s=timeout_s)
        return event_id

    async def events(self, *, limit: int = 20) -> list[EventInfo]:
        """The app's last events, newest first (emitted ones included), with each handler's delivery status."""
        return await self.client.events(limit=limit)

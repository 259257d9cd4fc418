"""The wake gate every engine's broker uses (``keel.backends.wake``): the rule it keeps, on every engine."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

import keel
from keel.backends import forget_memory, open_backend
from keel.backends.base import Backend, InstanceRef, NewMessage, StoreOptions
from keel.backends.sqlite import broker as sqlite_broker
from keel.backends.sqlite import wake as sqlite_wake

APP = "gate"


def ref(workflow_id: str = "1") -> InstanceRef:
    return InstanceRef(APP, "loan", workflow_id)


async def send(backend: Backend, workflow_id: str = "1") -> None:
    await backend.send(NewMessage(ref(workflow_id), uuid.uuid4().hex, "{}"))


async def timed_wait(backend: Backend, timeout_s: float) -> float:
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=timeout_s)
    return time.monotonic() - started


@pytest.fixture
def no_poll_no_datagram(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leave SQLite waits nothing but the gate: no poll of the file, no doorbell rung."""
    monkeypatch.setattr(sqlite_broker, "POLL_INTERVAL_S", 30.0)
    monkeypatch.setattr(sqlite_wake.Doorbell, "ring", lambda self, apps: None)


@pytest.fixture(params=["memory", "sqlite"])
def local_url(request: pytest.FixtureRequest) -> str:
    """A database that backends of one process share: in memory, or a file."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.mark.usefixtures("no_poll_no_datagram")
async def test_backends_of_one_process_on_one_database_wake_each_other_at_once(local_url: str) -> None:
    url = local_url
    waiter = await open_backend(url, StoreOptions())
    sender = await open_backend(url, StoreOptions())
    try:
        assert await waiter.claim(APP, ["loan"], worker="w", lease_s=5, limit=1) == []
        waiting = asyncio.create_task(timed_wait(waiter, 10))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await send(sender)
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 0.1  # typically well under a millisecond
    finally:
        await sender.aclose()
        await waiter.aclose()


@pytest.mark.usefixtures("no_poll_no_datagram")
async def test_a_memory_database_wakes_only_its_own_backends(memory_url: str) -> None:
    waiter = await open_backend(memory_url, StoreOptions())
    stranger = await open_backend(f"{memory_url}-other", StoreOptions())
    try:
        waiting = asyncio.create_task(timed_wait(waiter, 0.4))
        await asyncio.sleep(0.1)
        await send(stranger)
        assert await waiting >= 0.35
    finally:
        await stranger.aclose()
        await waiter.aclose()
        await forget_memory(f"{memory_url}-other")


async def test_a_wait_returns_once_for_what_it_was_told_not_again(backend_url: str) -> None:
    # The worker waits again without claiming when all its slots are busy: the same send must not end every wait.
    waiter = await open_backend(backend_url, StoreOptions())
    sender = await open_backend(backend_url, StoreOptions())
    try:
        assert await waiter.claim(APP, ["loan"], worker="w", lease_s=5, limit=1) == []
        await send(sender)  # between the claim and the wait: the wait returns at once
        assert await timed_wait(waiter, 5) < 1.0
        assert await timed_wait(waiter, 0.4) >= 0.35  # no claim since, nothing new: it parks
        await send(sender, "2")
        assert await timed_wait(waiter, 5) < 1.0  # something new: at once again
    finally:
        await sender.aclose()
        await waiter.aclose()


async def test_a_closed_backend_refuses_to_wait(backend_url: str) -> None:
    backend = await open_backend(backend_url, StoreOptions())
    await backend.aclose()
    with pytest.raises(keel.BackendUnavailable, match="closed"):
        await backend.wait_for_work(APP, timeout_s=1)

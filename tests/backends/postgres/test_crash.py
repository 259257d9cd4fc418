"""A PostgreSQL server killed with SIGKILL and restarted: committed writes survive, and the open store recovers.

Runs on a private server (``_server.py``), never on the shared one.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

import keel
from tests.backends.postgres._server import PrivateServer, skip_unless_possible
from tests.conftest import require_postgres

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: How long the first call after the crash may take to raise (it must raise, never hang).
FAIL_WITHIN_S = 15.0

#: How long after the restart the same open store must work again.
RECOVER_WITHIN_S = 20.0


@pytest.fixture
async def server() -> AsyncIterator[PrivateServer]:
    require_postgres()  # psycopg installed; the private server needs nothing else from the shared one
    skip_unless_possible()
    started = await asyncio.to_thread(PrivateServer.create)
    try:
        yield started
    finally:
        await asyncio.to_thread(started.destroy)


async def _write_some(store: keel.Store) -> dict[str, tuple[object, int]]:
    """Commit a few keys, some rewritten and one deleted, and return what each should hold: (value, version)."""
    expected: dict[str, tuple[object, int]] = {}
    for n in range(5):
        written = await store.put(f"k{n}", {"n": n}, expected_version=None)
        for step in range(n):
            written = await store.put(f"k{n}", {"n": n, "step": step}, expected_version=written.version)
        expected[f"k{n}"] = (written.value, written.version)
    counted = await asyncio.gather(*(store.update("counter", lambda c: c + 1, default=0) for _ in range(20)))
    expected["counter"] = (20, max(v.version for v in counted))
    gone = await store.put("gone", "bye", expected_version=None)
    await store.delete("gone", expected_version=gone.version)
    return expected


async def _first_success(store: keel.Store, key: str) -> keel.Versioned[object] | None:
    deadline = time.monotonic() + RECOVER_WITHIN_S
    while True:
        try:
            return await store.get(key)
        except keel.BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_committed_writes_survive_a_crash_and_the_open_store_recovers(server: PrivateServer) -> None:
    async with keel.open_store(server.url) as store:
        expected = await _write_some(store)

        await asyncio.to_thread(server.kill)
        started = time.monotonic()
        with pytest.raises(keel.BackendUnavailable) as caught:
            await store.get("k0")
        assert time.monotonic() - started < FAIL_WITHIN_S
        assert caught.value.hint

        await asyncio.to_thread(server.start)
        restarted = time.monotonic()
        await _first_success(store, "k0")
        assert time.monotonic() - restarted < RECOVER_WITHIN_S + 1, server.log_tail()

        for key, (value, version) in expected.items():
            got = await store.get(key)
            assert got is not None, key
            assert (got.value, got.version) == (value, version), key
        assert await store.get("gone") is None
        # The version counter survived the crash too: the re-created key continues after the tombstone.
        assert (await store.put("gone", "back", expected_version=None)).version == 3
        assert (await store.update("counter", lambda c: c + 1)).version == expected["counter"][1] + 1


async def test_calls_during_a_long_outage_fail_in_bounded_time_and_the_store_recovers(server: PrivateServer) -> None:
    # Longer than the pool's reconnect window (10 s), so its background attempts give up before the server returns.
    outage_s = 12.0
    async with keel.open_store(f"{server.url}?pool_timeout_s=2") as store:
        await store.put("k", "kept", expected_version=None)
        await asyncio.to_thread(server.kill)
        down_since = time.monotonic()
        failures = 0
        while time.monotonic() - down_since < outage_s:
            started = time.monotonic()
            with pytest.raises(keel.BackendUnavailable):
                await store.get("k")
            # The pool wait (2 s) plus a direct connection attempt to explain it ("Connection refused").
            assert time.monotonic() - started < 5
            failures += 1
            await asyncio.sleep(0.5)
        assert failures >= 3

        await asyncio.to_thread(server.start)
        got = await _first_success(store, "k")
        assert got is not None
        assert (got.value, got.version) == ("kept", 1)

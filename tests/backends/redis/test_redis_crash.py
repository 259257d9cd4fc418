"""A private redis-server killed with SIGKILL: what was acknowledged is still there when it comes back.

These tests start their own servers (``_server.py``) and never touch the shared one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import pytest

import keel
from keel.backends import open_backend
from keel.backends.base import MessageStatus, StoreOptions
from tests._engine import claim_one, commit_of, ref, send
from tests.backends.redis._server import DURABLE, private_redis
from tests.backends.redis._support import STORE_LOGGER

if TYPE_CHECKING:
    from pathlib import Path

    from keel.backends.base import StoreEngine

#: The next call after a kill must fail within this many seconds.
FAIL_WITHIN_S = 15.0

#: The restarted server must answer through the same open store within this many seconds.
BACK_WITHIN_S = 20.0


async def _write_several(store: keel.Store) -> dict[str, tuple[Any, int]]:
    """Write a few keys with several versions each and a deletion; return each live key's value and version."""
    expected: dict[str, tuple[Any, int]] = {}
    for i in range(5):
        key = f"crash:{{{i}}}"  # braces too: the escaped tags must survive the AOF replay
        for step in range(1, i + 2):
            written = await store.update(key, lambda s: {**s, "step": s["step"] + 1}, default={"step": 0, "i": i})
            assert (written.value["step"], written.version) == (step, step)
            expected[key] = (written.value, written.version)
    await store.delete("crash:{0}", expected_version=1)
    recreated = await store.put("crash:{0}", {"recreated": True}, expected_version=None)
    expected["crash:{0}"] = (recreated.value, 3)
    return expected


async def _wait_until_back(store: keel.Store | StoreEngine, key: str) -> None:
    deadline = time.monotonic() + BACK_WITHIN_S
    while True:
        try:
            await store.get(key)
        except keel.BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            return


@pytest.mark.redis
@pytest.mark.slow
async def test_acknowledged_writes_survive_a_sigkill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with (
        private_redis(tmp_path, *DURABLE) as server,
        caplog.at_level(logging.WARNING, logger=STORE_LOGGER),
    ):
        async with keel.open_store(server.url) as store:
            expected = await _write_several(store)

            server.kill()
            started = time.monotonic()
            with pytest.raises(keel.BackendUnavailable) as caught:
                await store.get("crash:{1}")
            assert time.monotonic() - started < FAIL_WITHIN_S
            assert server.url in str(caught.value)

            server.start()
            await _wait_until_back(store, "crash:{1}")
            for key, (value, version) in expected.items():
                got = await store.get(key)
                assert got is not None, key
                assert (got.value, got.version) == (value, version), key
            assert [v.version for v in await store.history("crash:{0}")] == [3, 2, 1]
            # The restart emptied the script cache: the write reloads the script and goes through.
            after = await store.put("crash:{4}", {"after": True}, expected_version=expected["crash:{4}"][1])
            assert after.version == expected["crash:{4}"][1] + 1
    assert [r.getMessage() for r in caplog.records if r.name == STORE_LOGGER] == []


@pytest.mark.redis
@pytest.mark.slow
async def test_a_server_that_stops_answering_times_out_and_is_not_resent_to(tmp_path: Path) -> None:
    with private_redis(tmp_path, *DURABLE) as server:
        async with keel.open_store(server.url) as store:
            await store.put("k", 1, expected_version=None)
            server.pause()
            started = time.monotonic()
            try:
                with pytest.raises(keel.BackendUnavailable, match="may or may not have been applied"):
                    await store.put("k", 2, expected_version=1)
                assert time.monotonic() - started < FAIL_WITHIN_S
            finally:
                server.resume()
            # The server ran the write once it woke: the reply was lost, not the write. Had the client resent
            # it, the resend would have failed as stale and update() would have applied its change twice.
            got = await store.get("k")
            assert got is not None
            assert (got.value, got.version) == (2, 2)


@pytest.mark.redis
async def test_persistence_is_read_from_info_when_config_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = ("--appendonly", "yes", "--appendfsync", "always", "--rename-command", "CONFIG", "")
    with private_redis(tmp_path, *options) as server, caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        async with keel.open_store(server.url) as store:
            await store.put("k", 1, expected_version=None)
    warnings = [r.getMessage() for r in caplog.records if r.name == STORE_LOGGER]
    assert len(warnings) == 1
    assert "appendonly is on, but appendfsync could not be read" in warnings[0]


@pytest.mark.redis
@pytest.mark.slow
async def test_the_runtime_survives_a_sigkill_and_its_waiters_hear_of_it(tmp_path: Path) -> None:
    instance = ref()
    with private_redis(tmp_path, *DURABLE) as server:
        backend = await open_backend(server.url, StoreOptions())
        try:
            ids = [await send(backend, instance, {"n": n}, message_id=f"m{n}") for n in range(3)]
            first = await claim_one(backend, lease_s=60)
            assert await backend.commit_turn(commit_of(first, {"seen": 1})) == 1
            second = await claim_one(backend, lease_s=60)
            waiting = asyncio.create_task(backend.wait_for_work("loans", timeout_s=30))
            await asyncio.sleep(0.1)

            server.kill()
            with pytest.raises(keel.BackendUnavailable):
                await asyncio.wait_for(waiting, FAIL_WITHIN_S)

            server.start()
            await _wait_until_back(backend.store, "any")
            # The lease, its token and the committed turn were all acknowledged, so all are still there;
            # the restart emptied the script cache, and the commit reloads its script.
            assert await backend.commit_turn(commit_of(second, {"seen": 2})) == 2
            statuses = [await backend.message("loans", message_id) for message_id in ids]
            assert [s.status if s else None for s in statuses] == [
                MessageStatus.done,
                MessageStatus.done,
                MessageStatus.pending,
            ]
            third = await claim_one(backend, lease_s=60)
            assert (third.message_id, third.state_version) == ("m2", 2)
            assert third.fencing_token == second.fencing_token + 1
        finally:
            await backend.aclose()


@pytest.mark.redis
@pytest.mark.slow
async def test_calls_queued_for_a_server_that_stopped_answering_are_told_it_is_unavailable(tmp_path: Path) -> None:
    # The fair queue's bound passes while the server hangs: that is an outage, not load, and must say so.
    with private_redis(tmp_path, *DURABLE) as server:
        backend = await open_backend(f"{server.url}?max_connections=1&pool_timeout_s=0.3", StoreOptions())
        try:
            server.pause()
            try:
                outcomes = await asyncio.gather(
                    *(backend.message("app", f"m{n}") for n in range(3)), return_exceptions=True
                )
            finally:
                server.resume()
            assert all(isinstance(outcome, keel.BackendUnavailable) for outcome in outcomes), outcomes
            queued = [o for o in outcomes if "no pooled connection within 0.3 s, and a new one fails" in str(o)]
            assert len(queued) == 2  # the first call held the connection and timed out on its own reply
            assert await backend.message("app", "m0") is None  # the server back, the same backend answers
        finally:
            await backend.aclose()

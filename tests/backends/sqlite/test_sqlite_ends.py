"""SQLite-only behaviour of waits for ends: another process's commit rings the waiting backend's socket in the file's
ends folder, where only backends waiting for an end bind one. What every engine shares is in
tests/conformance/test_wait_for_end.py."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

import pytest

from keel.backends.base import MessageStatus
from keel.backends.sqlite import wake
from tests._engine import APP, opened, ref, send, timed_wait
from tests.backends.sqlite.test_sqlite_wake import database_of, start_waker

if TYPE_CHECKING:
    from keel.backends.base import MessageInfo


@pytest.mark.processes
async def test_a_commit_in_another_process_wakes_a_wait_within_milliseconds(sqlite_url: str) -> None:
    async with opened(sqlite_url) as waiter:
        waiter.broker.ends.recheck_s = 300.0  # type: ignore[attr-defined]  # only the datagram may end it early
        message_id = await send(waiter, ref())

        async def ended_at() -> tuple[MessageInfo | None, float]:
            info = await waiter.wait_for_end(APP, message_id, timeout_s=30)
            return info, time.time()

        waiting = asyncio.create_task(ended_at())
        await asyncio.sleep(0.1)
        committer = await start_waker("commit", sqlite_url)
        out, err = await asyncio.wait_for(committer.communicate(), 60)
        assert committer.returncode == 0, err.decode()
        committing_at = float(out.decode().split()[0])  # just before the commit, in the other process
        info, woken_at = await asyncio.wait_for(waiting, 30)
        assert 0 <= woken_at - committing_at < 0.1
        assert info is not None and info.status is MessageStatus.done


async def test_only_backends_waiting_for_an_end_bind_a_socket_in_the_ends_folder(sqlite_url: str) -> None:
    folder = wake.ends_folder(database_of(sqlite_url))
    async with opened(sqlite_url) as worker, opened(sqlite_url) as client:
        await timed_wait(worker, 0.05)  # a worker's wait binds in the work folder only
        assert not folder.exists() or list(folder.iterdir()) == []
        message_id = await send(client, ref())
        info = await client.wait_for_end(APP, message_id, timeout_s=0.05)
        assert info is not None and info.status is MessageStatus.pending
        assert len(list(folder.iterdir())) == 1
    assert not folder.exists()  # the last one out removed it


async def test_a_datagram_that_does_not_parse_makes_every_wait_read_again(sqlite_url: str) -> None:
    async with opened(sqlite_url) as waiter:
        waiter.broker.ends.recheck_s = 300.0  # type: ignore[attr-defined]
        message_id = await send(waiter, ref())
        reads = 0
        message = waiter.broker.message  # type: ignore[attr-defined]

        async def counted(app: str, wanted: str) -> object:
            nonlocal reads
            reads += 1
            return await message(app, wanted)

        waiter.broker.message = counted  # type: ignore[attr-defined]
        waiting = asyncio.create_task(waiter.wait_for_end(APP, message_id, timeout_s=30))
        await asyncio.sleep(0.1)
        assert reads == 1
        [bound] = wake.ends_folder(database_of(sqlite_url)).iterdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ringer:
            ringer.sendto(b"not an end", str(bound))
        await asyncio.sleep(0.1)
        assert reads == 2 and not waiting.done()
        waiting.cancel()

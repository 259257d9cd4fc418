"""SQLite wake-ups across processes: each waiting backend's Unix datagram socket in its file's wake folder."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from keel.backends.base import Backend, InstanceRef, NewMessage
from keel.backends.sqlite import broker, wake
from tests._engine import APP, opened, ref, send, timed_wait
from tests.backends.sqlite._support import open_sqlite

WAKER = Path(__file__).with_name("waker.py")


def database_of(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


async def woken_at(backend: Backend, timeout_s: float) -> float:
    """The wall clock when ``wait_for_work`` returned."""
    await backend.wait_for_work(APP, timeout_s=timeout_s)
    return time.time()


async def start_waker(mode: str, url: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WAKER), mode, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


@pytest.fixture
def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the poll so slow that only a wake-up datagram can end a wait early."""
    monkeypatch.setattr(broker, "POLL_INTERVAL_S", 30.0)


@pytest.mark.processes
@pytest.mark.usefixtures("no_polling")
async def test_a_send_from_another_process_wakes_a_waiter_within_milliseconds(sqlite_url: str) -> None:
    async with opened(sqlite_url) as waiter:
        waiting = asyncio.create_task(woken_at(waiter, 30))
        await asyncio.sleep(0.1)
        sender = await start_waker("send", sqlite_url)
        out, err = await asyncio.wait_for(sender.communicate(), 60)
        assert sender.returncode == 0, err.decode()
        sending_at = float(out.decode().split()[0])  # just before the send, in the other process
        assert 0 <= await waiting - sending_at < 0.1


@pytest.mark.processes
@pytest.mark.usefixtures("no_polling")
async def test_the_socket_of_a_killed_process_is_removed_and_the_others_still_rung(sqlite_url: str) -> None:
    listener = await start_waker("listen", sqlite_url)
    assert listener.stdout is not None
    assert (await asyncio.wait_for(listener.stdout.readline(), 60)).strip() == b"listening"
    folder = wake.wake_folder(database_of(sqlite_url))
    [left_behind] = folder.iterdir()
    listener.kill()
    await listener.wait()
    assert left_behind.exists()  # SIGKILL gave it no chance to remove its socket
    async with opened(sqlite_url) as waiter, opened(sqlite_url) as sender:
        waiting = asyncio.create_task(timed_wait(waiter, 10))
        await asyncio.sleep(0.1)
        await send(sender, ref())
        assert await waiting < 1.0
        assert not left_behind.exists()
    assert not folder.exists()  # the last backend to leave removed the folder


async def test_a_sender_removes_a_dead_socket_and_the_folder_it_leaves_empty(sqlite_url: str) -> None:
    folder = wake.wake_folder(database_of(sqlite_url))
    folder.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(folder / "1-dead"))
    dead.close()  # its process is gone; the file stays
    async with opened(sqlite_url) as sender:
        await send(sender, ref())
    assert not folder.exists()


@pytest.mark.usefixtures("no_polling")
async def test_a_database_path_longer_than_a_socket_path_still_gets_wake_ups(tmp_path: Path) -> None:
    deep = tmp_path / ("a" * 100) / ("b" * 100)
    deep.mkdir(parents=True)
    url = f"sqlite:///{deep / 'keel.db'}"
    async with opened(url) as waiter, opened(url) as sender:
        waiting = asyncio.create_task(timed_wait(waiter, 10))
        await asyncio.sleep(0.1)
        [bound] = wake.wake_folder(database_of(url)).iterdir()
        assert len(str(bound)) < 100 < len(url)
        await send(sender, ref())
        assert await waiting < 1.0


@pytest.mark.usefixtures("no_polling")
async def test_a_send_to_another_app_rings_no_waiter(sqlite_url: str) -> None:
    async with opened(sqlite_url) as waiter, opened(sqlite_url) as sender:
        waiting = asyncio.create_task(timed_wait(waiter, 0.4))
        await asyncio.sleep(0.1)
        await sender.send(NewMessage(InstanceRef("other-app", "loan", "1"), uuid.uuid4().hex, "{}"))
        assert await waiting >= 0.35


async def test_the_wake_folder_is_private_and_closing_removes_the_socket_and_the_folder(sqlite_url: str) -> None:
    backend = await open_sqlite(sqlite_url)
    await backend.wait_for_work(APP, timeout_s=0.05)
    folder = wake.wake_folder(database_of(sqlite_url))
    assert folder.stat().st_mode & 0o777 == 0o700
    assert len(list(folder.iterdir())) == 1
    await backend.aclose()
    assert not folder.exists()


@pytest.mark.parametrize("obstacle", ["a file for a temporary folder", "a wake folder others may enter"])
async def test_an_unusable_wake_folder_means_polling_and_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, obstacle: str
) -> None:
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    temporary = tmp_path / "tmp"
    stranger = None
    if obstacle == "a file for a temporary folder":
        temporary.write_text("not a folder")
    else:
        folder = temporary / wake.wake_folder(database_of(url)).name
        folder.mkdir(parents=True, mode=0o755)
        folder.chmod(0o755)
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stranger.bind(str(folder / "stranger"))
        stranger.setblocking(False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(temporary))
    try:
        with caplog.at_level(logging.WARNING, logger=wake.__name__):
            async with opened(url) as waiter, opened(url) as sender:
                for _ in range(2):
                    waiting = asyncio.create_task(timed_wait(waiter, 10))
                    await asyncio.sleep(0.05)
                    await send(sender, ref())
                    assert await waiting < 5 * broker.POLL_INTERVAL_S + 0.5  # found by polling
        warnings = [r for r in caplog.records if r.name == wake.__name__ and r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "polling" in warnings[0].getMessage()
        if stranger is not None:
            with pytest.raises(BlockingIOError):
                stranger.recv(1024)  # nothing was sent into a folder that is not private
    finally:
        if stranger is not None:
            stranger.close()

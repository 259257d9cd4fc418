"""A private redis-server for tests that kill or reconfigure a server; the shared one is never touched.

It listens on a free loopback port, keeps its files in a test's temp dir, and runs in the foreground
(``--daemonize no``) as a child of the test, so the test can SIGKILL it and start it again on the same
dir and port.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
import redis

from tests.conftest import IN_CI

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

#: Options for a server that loses no acknowledged write: every write is appended and fsynced before the reply.
DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """One redis-server child process, started and killed at will, always on the same dir and port."""

    def __init__(self, binary: str, directory: Path, options: tuple[str, ...]) -> None:
        self.binary = binary
        self.directory = directory
        self.options = options
        self.port = free_port()
        self.log_path = directory / "redis-server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, ready_within_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--daemonize", "no",
            *self.options,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(ready_within_s)

    def kill(self) -> None:
        """SIGKILL the server: no shutdown, no final fsync, no snapshot."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)
            self._process = None

    def pause(self) -> None:
        """SIGSTOP the server: it keeps accepting connections (the kernel does) but answers nothing."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server if it runs (SIGTERM, then SIGKILL if it lingers)."""
        if self._process is None:
            return
        self.resume()  # a stopped process would not act on SIGTERM
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def _wait_ready(self, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while True:
                if self._process is not None and self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start:\n{self._log_tail()}")
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {within_s} s:\n{self._log_tail()}")
                time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])


@contextlib.contextmanager
def private_redis(directory: Path, *options: str) -> Iterator[PrivateRedis]:
    """Run a private redis-server with ``options`` for the duration of a block; skip if there is no binary."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed: the private-server tests need the binary"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    server = PrivateRedis(binary, directory, options)
    try:
        server.start()
        yield server
    finally:
        server.stop()

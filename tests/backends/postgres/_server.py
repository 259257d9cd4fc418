"""A private PostgreSQL server in a temporary folder, for tests that crash or restart the server.

The shared test server must never be killed, so crash tests start their own: ``initdb`` in a fresh folder,
``postgres`` on a free loopback port, run as the ``postgres`` system user (both refuse to run as root).
All methods block; from async tests call them through ``asyncio.to_thread``.

    server = PrivateServer.create()      # initdb + start, waits until it accepts connections
    try:
        server.kill()                    # SIGKILL to every server process: a crash, no shutdown
        server.start()                   # same data folder, same port: crash recovery runs
    finally:
        server.destroy()
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

#: Where Debian's PostgreSQL 15 keeps its programs.
PG_BIN = Path(os.environ.get("KEEL_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))

#: The system user the server runs as.
PG_USER = "postgres"

#: How long the server may take to accept connections after it is started (crash recovery included).
START_TIMEOUT_S = 30.0


def skip_unless_possible() -> None:
    """Skip the calling test when a private server cannot be started here."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "postgres").exists():
        pytest.skip(f"no PostgreSQL programs in {PG_BIN} (set KEEL_TEST_PG_BIN)")
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("a private PostgreSQL server needs root and runuser, to run it as the postgres user")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        pytest.skip(f"no {PG_USER!r} system user")


def free_port() -> int:
    """Return a loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateServer:
    """One throw-away PostgreSQL cluster listening on 127.0.0.1 only."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.data = base / "data"
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A URL for the ``postgres`` database as the ``postgres`` user (trust authentication)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls) -> PrivateServer:
        """Make a new cluster in a temporary folder and start it."""
        base = Path(tempfile.mkdtemp(prefix="keel-pg-"))
        server = cls(base, free_port())
        try:
            user = pwd.getpwnam(PG_USER)
            os.chown(base, user.pw_uid, user.pw_gid)
            server._run_as_postgres(
                [str(PG_BIN / "initdb"), "-D", str(server.data), "-U", PG_USER, "-A", "trust", "--no-sync"]
            )
            server.start()
        except BaseException:
            server.destroy()
            raise
        return server

    def start(self) -> None:
        """Start the server on its data folder and port, and wait until it accepts connections."""
        log = (self.base / "server.log").open("ab")
        command = [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.base)]
        command += ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=40"]
        self._process = subprocess.Popen(
            ["runuser", "-u", PG_USER, "--", *command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_ready()

    def kill(self) -> None:
        """Crash the server: SIGKILL to the postmaster and every process it started, no shutdown at all."""
        postmaster = self._postmaster_pid()
        victims = [postmaster, *_children(postmaster)] if postmaster else []
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reap()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in victims) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut the server down cleanly (fast mode), or kill it if it does not stop in time."""
        postmaster = self._postmaster_pid()
        if postmaster:
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGINT)
            deadline = time.monotonic() + 10
            while _alive(postmaster) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.kill()

    def destroy(self) -> None:
        """Stop the server if it runs and delete its folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for failure messages."""
        path = self.base / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                exited = self._process is not None and self._process.poll() is not None
                if exited or time.monotonic() > deadline:
                    raise RuntimeError(f"private PostgreSQL did not start:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def _postmaster_pid(self) -> int | None:
        # The first line of postmaster.pid; runuser may sit between our Popen and the postmaster.
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _reap(self) -> None:
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def _run_as_postgres(self, command: list[str]) -> None:
        result = subprocess.run(["runuser", "-u", PG_USER, "--", *command], capture_output=True, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{output}")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the server's backends and helpers), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent pid is the 4th field, after "pid (comm) state"; comm may contain spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0 until its parent reaps it; it holds no sockets or shared memory.
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

"""Start, signal and read real `keel worker` subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP_PATH = "tests.processes.workflows:app"


class WorkerProcess:
    """One `keel worker` subprocess, its log going to a file."""

    def __init__(self, url: str, log_path: Path, *, lease_s: float, concurrency: int = 8, grace_s: float = 3.0) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        command = [
            sys.executable,
            "-m",
            "keel.cli",
            "worker",
            APP_PATH,
            "--url",
            url,
            "--concurrency",
            str(concurrency),
            "--lease-s",
            str(lease_s),
            "--grace-s",
            str(grace_s),
            "--log-level",
            "DEBUG",
        ]
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def identity(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the worker's log after {timeout_s}s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL and -9 if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

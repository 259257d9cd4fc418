"""Run one side (keel's or a peer's) as its own process and read the CPU of everything it used around the clock.

The side runs the measured part between our ``go`` and its result (``drive.py``); right before and right after,
this reads ``/proc/<pid>/stat`` of the worker processes and of the database server processes serving this run,
so each figure covers the measured part only. The side reports its own CPU (``time.process_time``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[2]
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid`` (all its threads), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _snapshot(pids: list[int]) -> dict[int, float]:
    return {pid: used for pid in pids if (used := cpu_s(pid)) is not None}


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two snapshots; a process born in between counts whole (it was born for this run)."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


def run_side(
    python: str | Path,
    module: str,
    config: dict[str, Any],
    *,
    worker_pids: list[int],
    server_pids: Callable[[], list[int]],
    timeout_s: float = 900,
) -> dict[str, Any]:
    """Run ``python -m module CONFIG``; return its ready message and result, with the CPU read around the clock."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    if Path(python).resolve() != Path(sys.executable).resolve():
        env["PYTHONPATH"] = str(ROOT)  # a peer's environment gets bench.peers.drive, never keel
    command = [str(python), "-m", module, json.dumps(config)]
    with (
        tempfile.TemporaryFile("w+") as errors,
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True
        ) as side,
    ):
        try:
            result = _measure(side, worker_pids, server_pids, timeout_s)
        except SideFailedError as exc:
            errors.seek(0)
            raise SideFailedError(f"{module} {exc}: {_last_error(errors.read())}") from None
        errors.seek(0)
        warnings = [line for line in errors.read().splitlines() if "WARNING" in line]
        result["warnings"] = {"count": len(warnings), "first": warnings[0][:300] if warnings else None}
        return result


def _measure(
    side: subprocess.Popen[str], worker_pids: list[int], server_pids: Callable[[], list[int]], timeout_s: float
) -> dict[str, Any]:
    assert side.stdin is not None and side.stdout is not None
    try:
        ready = _read(side, side.stdout, "ready")
        workers_before, servers_before = _snapshot(worker_pids), _snapshot(server_pids())
        _tell(side.stdin, "go")
        result = _read(side, side.stdout, "result")["result"]
        workers_after, servers_after = _snapshot(worker_pids), _snapshot(server_pids())
        _tell(side.stdin, "done")
        side.wait(timeout_s)
    finally:
        if side.poll() is None:
            side.kill()
            side.wait()
    if side.returncode != 0:
        raise SideFailedError(f"exited with {side.returncode}")
    result["cpu_s"] = {
        "client": result.pop("cpu_s"),
        "workers": _spent(workers_before, workers_after),
        "server": _spent(servers_before, servers_after),
    }
    return {"versions": ready["versions"], "settings": ready["settings"], **result}


class SideFailedError(RuntimeError):
    """A side stopped before reporting its result; the message ends with the last line of its error output."""


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1][:500] if lines else "(no error output)"


def _read(side: subprocess.Popen[str], out: IO[str], key: str) -> dict[str, Any]:
    line = out.readline()
    if not line:
        side.wait(30)
        raise SideFailedError(f"stopped before saying {key!r} (exit code {side.returncode})")
    message: dict[str, Any] = json.loads(line)
    if key not in message:
        raise SideFailedError(f"expected {key!r}, got {line.strip()!r}")
    return message


def _tell(to: IO[str], word: str) -> None:
    to.write(word + "\n")
    to.flush()

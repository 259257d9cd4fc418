"""Start and stop real `keel worker` processes for a benchmark, and run it over engines into a report."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent


def start_workers(
    app_path: str, url: str, count: int, *, concurrency: int = 32, only: tuple[str, ...] = ()
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` workers for ``app_path`` on ``url`` and give them time to import and connect.

    ``only`` limits them to those workflows and handlers (``keel worker --only``).
    """
    # The benchmark's own modules, then the caller's path: workers must run the keel the client runs (a checkout's
    # src/ given in PYTHONPATH), not whichever one the interpreter has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [
        sys.executable,
        "-m",
        "keel.cli",
        "worker",
        app_path,
        "--url",
        url,
        "--concurrency",
        str(concurrency),
        "--log-level",
        "WARNING",
        *(arg for name in only for arg in ("--only", name)),
    ]
    workers = [subprocess.Popen(command, cwd=ROOT, env=env) for _ in range(count)]
    time.sleep(2.0)  # imports and connections; the figures start at the first send
    return workers


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker, then wait for each to exit."""
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(30)


def run_engines(
    benchmark: str, args: argparse.Namespace, run_engine: Callable[[str, argparse.Namespace], dict[str, object]]
) -> int:
    """Run ``run_engine`` for each of ``args.engines``, print each row, and write the report to ``args.out``.

    The report records the settings (every option but ``engines`` and ``out``) and the machine.
    """
    rows = []
    for engine in args.engines.split(","):
        row = run_engine(engine, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in {"engines", "out"}}
    report = {
        "benchmark": benchmark,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        **settings,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0

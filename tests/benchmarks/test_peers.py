"""The keel side of bench.peers at a tiny size on SQLite, through a real `keel worker`: the bench measures real work.

The peers' environments are never built here (bench/.peers/ is the bench's own business, on demand).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest
from bench import engines
from bench.peers import report
from bench.peers.__main__ import KEEL_APP
from bench.peers.sides import run_side
from bench.workers import start_workers, stop_workers

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.processes]


def test_the_keel_side_runs_three_recorded_steps_per_workflow_and_reports_its_figures(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'peers.db'}"
    engines.create_schema(url)
    base = {"engine": "sqlite", "url": url, "path": "", "warm_up": 1}
    closed = {**base, "scenario": "closed", "callers": 2, "seconds": 0.5}
    burst = {**base, "scenario": "open", "count": 10, "first": 1000}  # other instances than the first run's
    workers = start_workers(KEEL_APP, url, 1, concurrency=64)
    try:
        pids = [worker.pid for worker in workers]
        runs = [
            run_side(sys.executable, "bench.peers.keel_side", c, worker_pids=pids, server_pids=list)
            for c in (closed, burst)
        ]
    finally:
        stop_workers(workers)

    for got in runs:
        assert got["steps_recorded_by_first_workflow"] == 3  # read back from the backend after the clock stopped
        assert got["steps"] == 3 * got["workflows"]
        assert 0 < got["p50_ms"] <= got["p99_ms"]
        assert got["cpu_s"]["client"] > 0 and got["cpu_s"]["workers"] >= 0
        assert got["cpu_s"]["server"] == 0  # SQLite has no server
        assert got["versions"]["keel"]
    assert runs[0]["workflows"] >= 2
    # The worker did the turns: half a second of them is well over /proc's 10 ms tick (10 workflows may not be).
    assert runs[0]["cpu_s"]["workers"] > 0
    assert runs[1]["workflows"] == 10

    measured = [
        {"engine": "sqlite", "scenario": s, "side": "keel-1w", **got}
        for s, got in zip(("2 callers", "10 at once"), runs, strict=True)
    ]
    rows = report.rows(measured, {"sqlite": [1000.0]})
    # The row's rate is rounded before the ratio is taken, so compare within the last digit.
    assert [row["vs_raw"] for row in rows] == [pytest.approx(got["steps_per_s"] / 1000, abs=0.0011) for got in runs]
    assert "| sqlite | 2 callers | keel, 1 worker |" in report.markdown(rows)

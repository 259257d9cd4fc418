"""Benchmark: ``store.update`` throughput on each engine against a raw-driver loop, in the same run.

Scenarios: 1 and 4 processes, each on its own key ("distinct") or all on one key ("hot"). Each scenario
runs the raw loop and keel's loop back to back, ``--rounds`` times, alternating which goes first, and keeps
the median of each; the figure that matters is keel / raw, since the machine is shared and noisy.

Run: ``python -m bench.store_update [--engines sqlite,postgres,redis] [--seconds 3] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bench import engines
from bench.harness import measure
from bench.loops import keel_loop

if TYPE_CHECKING:
    from collections.abc import Callable

#: keel must reach this share of the raw loop's throughput (issue #3).
TARGET_RATIO = 0.75

SCENARIOS = [(1, False), (1, True), (4, False), (4, True)]


def run_scenario(
    engine: str,
    url: str,
    baselines: dict[str, Callable[[str, str, float], int]],
    processes: int,
    hot: bool,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Measure keel and every baseline, alternating their order round by round; keep the medians."""
    rates: dict[str, list[float]] = {name: [] for name in [*baselines, "keel"]}
    loops = {**baselines, "keel": keel_loop}
    for round_no in range(args.rounds):
        order = list(loops.items())
        if round_no % 2:
            order.reverse()
        for impl, loop in order:
            tag = f"{engine}-{impl}-{processes}-{hot}-{round_no}"
            done = measure(loop, url=url, processes=processes, hot=hot, seconds=args.seconds, tag=tag)
            rates[impl].append(done / args.seconds)
    medians = {impl: statistics.median(values) for impl, values in rates.items()}
    row: dict[str, object] = {"engine": engine, "processes": processes, "keys": "hot" if hot else "distinct"}
    for impl, rate in medians.items():
        row[f"{impl}_per_s"] = round(rate, 1)
    for name in baselines:
        row[f"keel/{name}"] = round(medians["keel"] / medians[name], 3)
    return row


def _line(row: dict[str, object]) -> str:
    rates = "  ".join(f"{k[:-6]} {float(str(v)):>8.1f}/s" for k, v in row.items() if k.endswith("_per_s"))
    ratios = "  ".join(f"{k} {float(str(v)):.2f}" for k, v in row.items() if k.startswith("keel/"))
    return f"{row['engine']:9} {row['processes']} proc {row['keys']:8}  {rates}  {ratios}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres,redis")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/store_update.json"))
    args = parser.parse_args(argv)
    rows = []
    for engine in args.engines.split(","):
        with engines.prepared(engine) as (url, baselines):
            for processes, hot in SCENARIOS:
                row = run_scenario(engine, url, baselines, processes, hot, args)
                rows.append(row)
                print(_line(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "store_update",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()},
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.out}; target: keel at least {TARGET_RATIO:.0%} of each raw loop")
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: keel against DBOS and LangGraph, the same durable 3-step workflow, side by side in one run.

Every side runs three no-op steps per workflow, each step's result durable before the next starts (SQLite
``synchronous=FULL``, PostgreSQL ``synchronous_commit=on``, Redis ``appendfsync always``), on a fresh instance each
time, on a fresh database per measurement. keel: a client process sends and waits (``client.wait``) while real
``keel worker --concurrency 64`` processes (1 or 2) run the turns. DBOS 3 and LangGraph 1 (``durability="sync"``)
run in their own virtual environments (``bench/.peers/``, built on first use from ``bench/peers/requirements-*.txt``)
and in the caller's process, as they are meant to. Redis is keel alone, on a private ``redis-server``.

Scenarios: closed loop with 1 and 16 callers (each sends, then waits for its result, and again), and an open loop
of 2,000 sent at once. The ceiling is the engine's raw single-row commit rate, measured in the same run. Rounds
alternate the order of keel and the peers; each row is the median of its rounds.

Run: ``python -m bench.peers [--quick] [--engines sqlite,postgres,redis] [--seconds 10] [--burst 2000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from bench import engines
from bench.peers import places, report, sides, venvs
from bench.workers import start_workers, stop_workers

if TYPE_CHECKING:
    from collections.abc import Callable

KEEL_APP = "bench.peers.keel_app:app"
#: The engines each peer runs on (keel runs on all three).
PEER_ENGINES = {"dbos": ("sqlite", "postgres"), "langgraph": ("sqlite", "postgres")}


def measure(side: str, engine: str, scenario: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One measurement of ``side`` on a fresh place: keel with its workers, or a peer in its environment."""
    with places.fresh(engine) as place:
        config = {"engine": engine, "url": place.url, "path": place.path, "warm_up": args.warm_up, **scenario}
        if side.startswith("keel"):
            engines.create_schema(place.url)
            workers = start_workers(KEEL_APP, place.url, int(side[-2]), concurrency=64)
            try:
                pids = [worker.pid for worker in workers]
                return sides.run_side(
                    sys.executable, "bench.peers.keel_side", config, worker_pids=pids, server_pids=place.server_pids
                )
            finally:
                stop_workers(workers)
        python = venvs.python_of(side)
        return sides.run_side(python, f"bench.peers.{side}_side", config, worker_pids=[], server_pids=place.server_pids)


def scenarios(args: argparse.Namespace) -> list[dict[str, Any]]:
    closed = [
        {"name": f"{n} caller{'s' * (n > 1)}", "scenario": "closed", "callers": n, "seconds": args.seconds}
        for n in args.callers
    ]
    return [*closed, {"name": f"{args.burst:,} at once", "scenario": "open", "count": args.burst}]


def sides_on(engine: str, args: argparse.Namespace, round_no: int) -> list[str]:
    """keel and the peers interleaved, in the opposite order every other round."""
    keel = [f"keel-{n}w" for n in args.workers]
    peers = [peer for peer in args.peers if engine in PEER_ENGINES[peer]]
    order = [side for pair in zip(keel, peers + [""] * len(keel), strict=False) for side in pair if side]
    order += peers[len(keel) :]
    return order[::-1] if round_no % 2 else order


def run(args: argparse.Namespace, on_round: Callable[..., None] | None = None) -> dict[str, Any]:
    """Every round, engine, scenario and side; ``on_round(measurements, ceilings)`` after each round."""
    measurements: list[dict[str, Any]] = []
    ceilings: dict[str, list[float]] = {engine: [] for engine in args.engines}
    versions: dict[str, dict[str, str]] = {}
    settings: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    for round_no in range(args.rounds):
        for engine in args.engines:
            ceilings[engine].append(places.raw_commits_per_s(engine, args.raw_seconds))
            print(f"round {round_no + 1} {engine}: raw commits {ceilings[engine][-1]:,.0f}/s", flush=True)
            for scenario in scenarios(args):
                for side in sides_on(engine, args, round_no):
                    where = {"engine": engine, "scenario": scenario["name"], "side": side}
                    try:
                        got = measure(side, engine, scenario, args)
                    except sides.SideFailedError as exc:
                        # A failure is a result too (keel's "load reported as an outage", issue #11): keep going.
                        measurements.append({**where, "failed": str(exc)})
                        print(f"  {scenario['name']:>14}  {side:9}  FAILED: {exc}", flush=True)
                        continue
                    versions.setdefault(side.split("-")[0], {}).update(got.pop("versions"))
                    settings[f"{side}/{engine}"] = got.pop("settings")
                    measurements.append({**where, **got})
                    print(f"  {scenario['name']:>14}  {side:9}  {_summary(got)}", flush=True)
        if on_round is not None:
            on_round(measurements, ceilings)
    return {
        "measurements": measurements,
        "ceilings": ceilings,
        "versions": versions,
        "settings": settings,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }


def _summary(got: dict[str, Any]) -> str:
    cpu = got["cpu_s"]
    return (
        f"{got['steps_per_s']:8,.0f} steps/s  p50 {got['p50_ms']:6.1f} ms  p99 {got['p99_ms']:7.1f} ms  "
        f"cpu client {cpu['client']:.2f}s workers {cpu['workers']:.2f}s server {cpu['server']:.2f}s  "
        f"(first workflow recorded {got['steps_recorded_by_first_workflow']} steps)"
    )


def machine() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
    }
    try:
        with psycopg.connect(engines.POSTGRES_DSN, autocommit=True) as conn:
            for name in ("server_version", "synchronous_commit", "fsync"):
                row = conn.execute(f"SHOW {name}").fetchone()
                facts[f"postgres_{name}"] = row[0] if row else None
    except psycopg.OperationalError as exc:
        facts["postgres"] = f"unreachable: {exc}"
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False)
    facts["redis_server"] = redis.stdout.strip()
    return facts


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres,redis", help="comma-separated")
    parser.add_argument("--peers", default="dbos,langgraph", help="comma-separated; empty for keel alone")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each closed-loop measurement")
    parser.add_argument("--burst", type=int, default=2000, help="workflows sent at once in the open loop")
    parser.add_argument("--rounds", type=int, default=3, help="each row is the median of this many")
    parser.add_argument("--callers", default="1,16", help="closed-loop caller counts, comma-separated")
    parser.add_argument("--workers", default="1,2", help="keel worker process counts, comma-separated")
    parser.add_argument("--warm-up", type=int, default=5, help="unmeasured workflows per side before the clock")
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="length of the raw commit loop")
    parser.add_argument("--quick", action="store_true", help="for development: 2 s, 200 at once, 1 round")
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.burst, args.rounds, args.warm_up, args.raw_seconds = 2.0, 200, 1, 2, 1.0
    args.engines = [e for e in args.engines.split(",") if e]
    args.peers = [p for p in args.peers.split(",") if p]
    args.callers = [int(n) for n in args.callers.split(",")]
    args.workers = [int(n) for n in args.workers.split(",")]
    for peer in args.peers:
        if peer not in PEER_ENGINES:
            parser.error(f"unknown peer {peer!r}; choose from {', '.join(PEER_ENGINES)}")
    if args.seconds <= 0 or args.burst < 2 or args.rounds < 1:
        parser.error("--seconds must be positive, --burst at least 2 and --rounds at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = datetime.now(UTC)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save_so_far(measurements: list[dict[str, Any]], ceilings: dict[str, list[float]]) -> None:
        partial = {"benchmark": "peers", "partial": True, "measurements": measurements, "ceilings": ceilings}
        args.out.write_text(json.dumps(partial, indent=2) + "\n")

    outcome = run(args, save_so_far)
    table = report.rows(outcome["measurements"], outcome["ceilings"])
    settings = {k: v for k, v in vars(args).items() if k not in {"out"}}
    command = "python -m bench.peers " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {
        "benchmark": "peers",
        "when": started.isoformat(timespec="seconds"),
        "minutes": round((time.time() - started.timestamp()) / 60, 1),
        "command": command.strip(),
        "machine": machine(),
        "options": settings,
        **outcome,
        "rows": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    markdown = _header(result) + "\n" + report.markdown(table)
    args.out.with_suffix(".md").write_text(markdown)
    print("\n" + markdown)
    print(f"results written to {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _header(result: dict[str, Any]) -> str:
    facts = result["machine"]
    versions = "; ".join(
        f"{side}: " + ", ".join(f"{name} {version}" for name, version in found.items())
        for side, found in result["versions"].items()
    )
    load = result["load_average"]
    return (
        f"`{result['command']}`, {result['when']} ({result['minutes']} min): {facts['cpus']} cores, "
        f"{facts['platform']}, Python {facts['python']}, SQLite {facts['sqlite']}, "
        f"PostgreSQL {facts.get('postgres_server_version')} "
        f"(synchronous_commit={facts.get('postgres_synchronous_commit')}, fsync={facts.get('postgres_fsync')}), "
        f"{facts['redis_server'].split(' sha=')[0]}; load average "
        f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after.\n\nVersions: {versions}.\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the time goes: statements, transactions, round trips and CPU per turn and per step, on each engine.

One worker runs in a child process of this one (``keel.worker.serve``, ``--concurrency 32``), the client here.
Each process counts, at the driver, the statements it sends (``sqlite3`` trace callback; psycopg's ``execute`` and
``executemany``; redis-py's commands) and the transactions they make; round trips are the data segments its TCP
sockets sent (``ss -ti``), so pipelined statements count once. CPU comes from ``/proc``: the client (this process),
the worker (the child) and the database server (PostgreSQL: the backends of the worker's connections; Redis: the
whole server, which other users of the machine may share). Two workflows of ``bench/turns_app.py`` run: ``tick``
(a bare turn) and ``stepped`` (three no-op steps, then the commit); a step costs the difference divided by three.

Run: ``python -m bench.where [--engines sqlite,postgres,redis] [--turns 2000] [--spy]``; ``--spy`` also samples the
worker with py-spy and prints the functions it spends most of its time in.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import engines

CLK = os.sysconf("SC_CLK_TCK")


class Counts:
    """Statements and transactions sent by one process, counted at the driver."""

    def __init__(self) -> None:
        self.statements = 0
        self.transactions = 0
        self.by_kind: collections.Counter[str] = collections.Counter()

    def saw(self, text: str, n: int = 1) -> None:
        head = text.lstrip().split(None, 1)[0].upper() if text.strip() else "?"
        if head == "EXECUTE":  # a statement keel prepared (scripts.py): by its name
            head = text.split(None, 2)[1].split("(", 1)[0]
        self.statements += n
        self.by_kind[head] += n
        if head in {"BEGIN", "EVALSHA", "EVAL"}:
            self.transactions += n

    def snapshot(self) -> dict[str, Any]:
        return {"statements": self.statements, "transactions": self.transactions, "by_kind": dict(self.by_kind)}


COUNTS = Counts()


def install_counters() -> None:
    """Count what this process sends through sqlite3, psycopg and redis-py."""
    import sqlite3

    connect = sqlite3.connect

    def counted_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.set_trace_callback(COUNTS.saw)
        return conn

    sqlite3.connect = counted_connect  # type: ignore[assignment]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        _wrap_psycopg(psycopg.AsyncCursor)  # AsyncConnection.execute goes through it
    try:
        from redis.asyncio.client import Redis
    except ImportError:
        return
    execute = Redis.execute_command

    async def counted(self: Any, *args: Any, **options: Any) -> Any:
        COUNTS.saw(str(args[0]))
        return await execute(self, *args, **options)  # type: ignore[no-untyped-call]

    Redis.execute_command = counted  # type: ignore[method-assign]


def _wrap_psycopg(cls: Any) -> None:
    execute = cls.execute

    async def counted_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        text = query.decode() if isinstance(query, bytes) else str(query)
        statements = text.split(";\n")
        if len(statements) > 1 and text.startswith("EXECUTE"):
            # keel's scripts (scripts.py): prepared statements in one message, one implicit transaction.
            COUNTS.transactions += 1
            for statement in statements:
                COUNTS.saw(statement)
        else:
            COUNTS.saw(text)
        return await execute(self, query, *args, **kwargs)

    cls.execute = counted_execute
    if hasattr(cls, "executemany"):
        executemany = cls.executemany

        async def counted_many(self: Any, query: Any, params_seq: Any, **kwargs: Any) -> Any:
            params = list(params_seq)
            COUNTS.saw(str(query), len(params))
            return await executemany(self, query, params, **kwargs)

        cls.executemany = counted_many


def _worker(url: str, out: str) -> None:
    """The child: a worker with counted drivers, writing its counts to ``out`` when it stops."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("keel").setLevel(logging.ERROR)
    install_counters()
    from bench.turns_app import app
    from keel.worker import WorkerSettings, serve

    # The parent asks for the counts so far (before the measured run) with SIGUSR1.
    signal.signal(signal.SIGUSR1, lambda *_: Path(out + ".before").write_text(json.dumps(COUNTS.snapshot())))

    asyncio.run(serve(app, url, WorkerSettings(concurrency=32)))
    Path(out).write_text(json.dumps(COUNTS.snapshot()))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def segments(pid: int) -> int:
    """Data segments the TCP sockets of ``pid`` have sent (one per write the kernel sent alone)."""
    text = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    total, mine = 0, False
    for line in text.splitlines():
        if not line.startswith(("\t", " ")):
            mine = f"pid={pid}," in line
        elif mine:
            found = re.search(r"data_segs_out:(\d+)", line)
            total += int(found.group(1)) if found else 0
    return total


def server_pids(engine: str, clients: list[int]) -> list[int]:
    """The server processes that serve ``clients``: their PostgreSQL backends, or the Redis server."""
    if engine == "redis":
        out = subprocess.run(["pgrep", "-x", "redis-server"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    if engine != "postgres":
        return []
    import psycopg

    text = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, check=True).stdout
    ports = [
        int(m.group(1))
        for m in re.finditer(r":(\d+)\s+127\.0\.0\.1:5432\s+users:\(\(\"[^\"]+\",pid=(\d+),", text)
        if int(m.group(2)) in clients
    ]
    with psycopg.connect(engines.POSTGRES_DSN, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", (ports,)).fetchall()
    return [int(r[0]) for r in rows]


async def _client_run(engine: str, url: str, workflow: str, n: int, worker: int) -> dict[str, Any]:
    """Send ``n`` messages to fresh instances at once, then wait for each; count and time both halves."""
    from bench.turns_app import Tick, app

    me = os.getpid()
    async with app.client(url=url) as client:
        await asyncio.gather(*(client.state(workflow, f"warm-up-{i}") for i in range(10)))  # fill the pool
        servers = server_pids(engine, [worker, me])
        cpu = {"client": cpu_s(me), "worker": cpu_s(worker), "server": sum(cpu_s(p) for p in servers)}
        segs, counts = segments(me), COUNTS.snapshot()
        started = time.perf_counter()
        ids = await asyncio.gather(*(client.send(workflow, f"run-{i}", Tick(n=i)) for i in range(n)))
        sent_segs, sent = segments(me), COUNTS.snapshot()
        for i, message_id in enumerate(ids):
            await client.wait(workflow, f"run-{i}", message_id, timeout_s=300)
        elapsed = time.perf_counter() - started
        now = {"client": cpu_s(me), "worker": cpu_s(worker), "server": sum(cpu_s(p) for p in servers)}
        return {
            "turns_per_s": round(n / elapsed, 1),
            "cpu_ms_per_turn": {k: round(1000 * (now[k] - cpu[k]) / n, 3) for k in cpu},
            "client_send_per_turn": _per(counts, sent, n, sent_segs - segs),
            "client_wait_per_turn": _per(sent, COUNTS.snapshot(), n, segments(me) - sent_segs),
        }


async def _warm_up(url: str, workflow: str) -> None:
    from bench.turns_app import Tick, app

    async with app.client(url=url) as client:
        ids = await asyncio.gather(*(client.send(workflow, f"warm-{i}", Tick(n=i)) for i in range(50)))
        for i, message_id in enumerate(ids):
            await client.wait(workflow, f"warm-{i}", message_id, timeout_s=60)


def spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(raw: Path, limit: int = 25) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The share of samples in each function itself, and in it or what it calls, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [
            re.sub(r":\d+\)$", ")", re.sub(r" \(.*?/(src|site-packages|lib/python[\d.]+)/", " (", f))
            for f in stack.split(";")
        ]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / max(total, 1), 1)) for name, n in counter.most_common(limit)]

    return share(own), share(inclusive)


def measure(engine: str, url: str, workflow: str, n: int, use_spy: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = Path(f"/tmp/keel-where-{os.getpid()}-{workflow}.json")
    child = ctx.Process(target=_worker, args=(url, str(out)))
    child.start()
    assert child.pid is not None
    time.sleep(2.5)  # imports, connections, first idle wait
    asyncio.run(_warm_up(url, workflow))  # pools filled, plans prepared, on both sides
    time.sleep(0.5)
    worker_segs = segments(child.pid)
    spying = spy(child.pid, 3, out.with_suffix(".spy")) if use_spy else None
    measured = _child_counts(child.pid, out)
    row: dict[str, Any] = {"engine": engine, "workflow": workflow}
    try:
        row.update(asyncio.run(_client_run(engine, url, workflow, n, child.pid)))
        worker_segs = segments(child.pid) - worker_segs
        if spying is not None:
            spying.wait()
    finally:
        child.terminate()
        child.join(30)
    done = json.loads(out.read_text())
    out.unlink()
    row["worker_per_turn"] = _per(measured, done, n, worker_segs if engine != "sqlite" else 0)
    if spying is not None and out.with_suffix(".spy").exists():
        row["worker_profile_self"], row["worker_profile_inclusive"] = top_frames(out.with_suffix(".spy"))
        out.with_suffix(".spy").unlink()
    return row


def _child_counts(pid: int, out: Path) -> dict[str, Any]:
    before = Path(f"{out}.before")
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30  # the child answers between two bytecodes: slow on a loaded machine
    while not before.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    counts: dict[str, Any] = json.loads(before.read_text())
    before.unlink()
    return counts


def _per(a: dict[str, Any], b: dict[str, Any], n: int, segs: int) -> dict[str, Any]:
    kinds = {k: round((b["by_kind"].get(k, 0) - a["by_kind"].get(k, 0)) / n, 2) for k in b["by_kind"]}
    return {
        "statements": round((b["statements"] - a["statements"]) / n, 2),
        "transactions": round((b["transactions"] - a["transactions"]) / n, 2),
        "round_trips": round(segs / n, 2),
        "by_kind": {k: v for k, v in kinds.items() if v},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres,redis")
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--spy", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/where.json"))
    args = parser.parse_args(argv)
    logging.getLogger("keel").setLevel(logging.ERROR)
    install_counters()
    rows = []
    for engine in args.engines.split(","):
        with engines.prepared(engine) as (url, _):
            for workflow in ("tick", "stepped"):
                row = measure(engine, url, workflow, args.turns, args.spy)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

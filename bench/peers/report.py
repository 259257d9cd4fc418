"""Fold the measurements of every round into rows (medians), with ratios, and render them as Markdown."""

from __future__ import annotations

import statistics
from typing import Any

#: How each side is named in the table.
LABELS = {"keel-1w": "keel, 1 worker", "keel-2w": "keel, 2 workers", "dbos": "DBOS", "langgraph": "LangGraph"}
PEERS = ("dbos", "langgraph")


def rows(measurements: list[dict[str, Any]], ceilings: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per engine, scenario and side: the median of its rounds, and keel's ratios to the peers and raw."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for m in measurements:
        groups.setdefault((m["engine"], m["scenario"], m["side"]), []).append(m)
    result = [_row(key, runs) for key, runs in groups.items()]
    rate = {(r["engine"], r["scenario"], r["side"]): r.get("steps_per_s") for r in result}
    for row in result:
        if not row["side"].startswith("keel") or "steps_per_s" not in row:
            continue
        for peer in PEERS:
            theirs = rate.get((row["engine"], row["scenario"], peer))
            row[f"vs_{peer}"] = round(row["steps_per_s"] / theirs, 2) if theirs else None
        raw = statistics.median(ceilings[row["engine"]])
        row["raw_commits_per_s"] = round(raw, 1)
        row["vs_raw"] = round(row["steps_per_s"] / raw, 3)
    return result


def _row(key: tuple[str, str, str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of the rounds that finished, and what the others failed with."""
    finished = [run for run in runs if "failed" not in run]
    failures = [run["failed"] for run in runs if "failed" in run]
    row: dict[str, Any] = (
        _median_row(key, finished) if finished else {"engine": key[0], "scenario": key[1], "side": key[2]}
    )
    if failures:
        row["failed"] = {"rounds": len(failures), "of": len(runs), "errors": failures}
    return row


def _median_row(key: tuple[str, str, str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    engine, scenario, side = key

    def median(pick: Any) -> float:
        return float(statistics.median(pick(run) for run in runs))

    return {
        "engine": engine,
        "scenario": scenario,
        "side": side,
        "rounds": len(runs),
        "steps_per_s": round(median(lambda r: r["steps_per_s"]), 1),
        "p50_ms": round(median(lambda r: r["p50_ms"]), 1),
        "p99_ms": round(median(lambda r: r["p99_ms"]), 1),
        **{
            f"cpu_ms_per_step_{part}": round(median(lambda r, part=part: 1000 * r["cpu_s"][part] / r["steps"]), 2)
            for part in ("client", "workers", "server")
        },
    }


def markdown(table_rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table, engine by engine, scenario by scenario."""
    head = (
        "| engine | scenario | who | steps/s | p50 ms | p99 ms | CPU ms/step: client | workers | server "
        "| keel / DBOS | keel / LangGraph | keel / raw commits |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    order = {side: i for i, side in enumerate(LABELS)}
    ordered = sorted(table_rows, key=lambda r: (r["engine"], r["scenario"], order.get(r["side"], 99)))
    failures = [
        f"- {r['engine']}, {r['scenario']}, {LABELS.get(r['side'], r['side'])}: failed in {r['failed']['rounds']} of "
        f"{r['failed']['of']} rounds: {r['failed']['errors'][0]}\n"
        for r in ordered
        if "failed" in r
    ]
    return head + "".join(_line(row) for row in ordered) + ("\nFailures:\n" + "".join(failures) if failures else "")


def _line(row: dict[str, Any]) -> str:
    if "steps_per_s" not in row:
        return (
            f"| {row['engine']} | {row['scenario']} | {LABELS.get(row['side'], row['side'])} | failed |"
            + " |" * 8
            + "\n"
        )
    keel = row["side"].startswith("keel")
    # A peer runs the workflow in the caller's process: its one process's CPU is the "workers" figure.
    client = f"{row['cpu_ms_per_step_client']:.2f}" if keel else "(in process)"
    workers = row["cpu_ms_per_step_workers"] if keel else row["cpu_ms_per_step_client"]
    server = "" if row["engine"] == "sqlite" else f"{row['cpu_ms_per_step_server']:.2f}"
    ratios = [_ratio(row.get("vs_dbos")), _ratio(row.get("vs_langgraph")), _ratio(row.get("vs_raw"))]
    failed = f" ({row['failed']['rounds']} of {row['failed']['of']} failed)" if "failed" in row else ""
    cells = [
        row["engine"],
        row["scenario"],
        LABELS.get(row["side"], row["side"]),
        f"{row['steps_per_s']:,.0f}{failed}",
        f"{row['p50_ms']:.1f}",
        f"{row['p99_ms']:.1f}",
        client,
        f"{workers:.2f}",
        server,
        *ratios,
    ]
    return "| " + " | ".join(str(cell) for cell in cells) + " |\n"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"

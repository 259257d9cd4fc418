"""What the demo found: one result per way, the verdict, and how both are shown."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.table import Table

from keel.demo.ways import LABELS, Way

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class WayResult:
    """How one way of counting did."""

    way: Way
    applied: int
    attempted: int
    #: How many times the update function ran beyond one per update (keel's way only).
    retried: int | None = None

    @property
    def lost(self) -> int:
        """Updates attempted but not in the state a reader sees."""
        return self.attempted - self.applied

    @property
    def summary(self) -> str:
        """``applied of attempted — lost``, as the tables show it."""
        lost = f"{self.lost:,} lost" if self.lost else "none lost"
        return f"{self.applied:,} of {self.attempted:,} — {lost}"


class Verdict(enum.StrEnum):
    """What the run proves."""

    #: keel applied every update, and both naive ways lost some: the demo showed what it is about.
    ok = "ok"
    #: keel lost an update: a bug in keel or in the backend.
    keel_lost = "keel_lost"
    #: A naive way lost nothing: the race was not reproduced, so the numbers prove nothing.
    naive_lost_nothing = "naive_lost_nothing"


def verdict(results: list[WayResult]) -> Verdict:
    """Judge a run: keel must lose nothing, and each naive way must have lost something."""
    if any(r.lost for r in results if r.way is Way.keel_update):
        return Verdict.keel_lost
    if any(not r.lost for r in results if r.way is not Way.keel_update):
        return Verdict.naive_lost_nothing
    return Verdict.ok


def show_results(console: Console, results: list[WayResult], processes: int, updates: int) -> None:
    """Print the final table, the explanation and the verdict."""
    console.print()
    console.print(_table(results))
    console.print()
    console.print(_explanation(results, processes, updates))
    console.print()
    console.print(_verdict_line(results))


def _table(results: list[WayResult]) -> Table:
    table = Table(title="Updates applied of updates attempted")
    table.add_column("way")
    table.add_column("applied of attempted", justify="right")
    table.add_column("retried", justify="right")
    for r in results:
        style = "green" if not r.lost else "red"
        retried = "—" if r.retried is None else f"{r.retried:,}"
        table.add_row(LABELS[r.way], f"[{style}]{r.summary}[/]", retried)
    return table


def _explanation(results: list[WayResult], processes: int, updates: int) -> str:
    retried = next((r.retried for r in results if r.retried is not None), 0)
    return (
        f"Why: [bold]in memory[/], each of the {processes} replicas counts only its own {updates:,} updates, so "
        "whoever reads sees one replica's copy and the others' work is invisible to it — state that lives in a "
        "process is neither shared nor durable. [bold]Get then set[/] shares the record but not the decision: "
        "in every round all processes read the same value, added one and wrote it back, so each write "
        f"overwrote the others and one update per round survived ({updates:,} of {processes * updates:,}). "
        "[bold]keel store.update[/] reads the value with its version and writes with a compare-and-swap on "
        "that version: when another process got there first, the write is refused, nothing is overwritten, "
        f"and the function runs again on the new value — that happened {retried:,} times here, and it is "
        "why every update landed."
    )


def _verdict_line(results: list[WayResult]) -> str:
    found = verdict(results)
    if found is Verdict.keel_lost:
        return "[bold red]keel lost updates. That must never happen: please report it with the output above.[/]"
    if found is Verdict.naive_lost_nothing:
        lucky = ", ".join(LABELS[r.way] for r in results if r.way is not Way.keel_update and not r.lost)
        return (
            f"[bold red]The demo failed to reproduce the race: {lucky} lost nothing this time, "
            "so these numbers prove nothing about keel.[/]"
        )
    return "[bold green]keel lost no update.[/]"

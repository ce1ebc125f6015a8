"""What every benchmark shares: its progress callback, the machine it ran on, and how its figures and goals
are printed. Goals are reported, never asserted: a benchmark's figures depend on the machine."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

PIPED_COLUMNS = 200  # a report's width into a file or a pipe

Progress = Callable[[str], None]  # one line of progress, for stderr


def quiet(_: str) -> None:
    """A Progress that says nothing."""


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): other work on a shared machine
    skews every wall clock, so each report records it at its start and its end."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine() -> dict[str, Any]:
    """The machine as every report records it at its start (cores, platform, load)."""
    import platform

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average": load_average()}


def load_text(machine_info: dict[str, Any]) -> str:
    """'load average 1.2 at start, 1.9 at end', or "" when either is unknown."""
    start, end = machine_info.get("load_average"), machine_info.get("load_average_end")
    return f"load average {start[0]:.1f} at start, {end[0]:.1f} at end" if start and end else ""


def si(value: float | None, unit: str = "") -> str:
    """A figure with an SI prefix: 1.23 GFLOP/s; '-' for None or a value that is not finite."""
    if value is None or not math.isfinite(value):
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}".rstrip()


def plain(text: str) -> str:
    """A model's or a user's text for `console().print` and rich tables: control characters as escapes
    (`text.inert`) and rich markup escaped, so "[bold]" or "list[int]" prints as written."""
    from rich.markup import escape

    from epo_tui.text import inert

    return escape(inert(text))


def console():
    """A rich console on stdout for a report: no highlighting, long lines kept whole. Into a file or a pipe
    it lays tables out PIPED_COLUMNS wide (rich would take 80, wrapping every label and prompt) unless
    COLUMNS says otherwise."""
    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPED_COLUMNS
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width)


def print_goals(out, goals: list[dict[str, Any]]) -> None:
    """The goal rows (goal, target, measured, met) as one table on the console `out`."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("goal", "target", "measured", "met"):
        table.add_column(name)
    for goal in goals:
        table.add_row(Text(goal["goal"]), Text(str(goal["target"])), f"{goal['measured']:.3g}",
                      "[green]yes[/]" if goal["met"] else "[red]no[/]")
    out.print(table)

"""Progress of headless runs on stderr: rich bars in a terminal, a line now and then in logs.

Both displays implement `epo_tui.engine.runner.Reporter` by duck typing (this module stays free of
the engine and its heavy imports).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from epo_tui.budget import eta_seconds, format_budget
from epo_tui.text import inert


def progress_reporter():
    """Live bars when stderr is a terminal, else a line now and then (logs stay readable)."""
    return _ProgressBars() if sys.stderr.isatty() else _ProgressLines()


class _Progress:
    """What both progress displays track (implements epo_tui.engine.runner.Reporter)."""

    def __init__(self):
        self.label, self.total, self.seconds, self.deadline = "", 0, [], None
        self.penalty_scale = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def batch_started(self, features: list[int]) -> None:
        pass

    def batch_skipped(self, features: list[int], out: Path) -> None:
        self.line(f"epo-tui: batch: already done in {inert(str(out))}/, not run again: features "
                  f"{', '.join(map(str, features))}")

    def line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def search_started(self, label: str, iterations: int, deadline=None, penalty_scale: str = "") -> None:
        self.label, self.total, self.seconds = label, iterations, []
        self.deadline = deadline if deadline is not None and deadline.seconds is not None else None
        self.penalty_scale = penalty_scale

    def penalty_line(self) -> None:
        """What λ means in this search (engine/penalty_scale.py's description), when the run said."""
        if self.penalty_scale:
            self.line(f"epo-tui: {self.label}: {inert(self.penalty_scale)}")

    def elites_ready(self, state, texts: list[str]) -> None:
        """One line as soon as the starting elites exist: the first iteration compiles, so it may be a
        while before the next."""
        best = int(state.act_K.argmax())
        self.line(f"epo-tui: {self.label}: {len(texts)} starting elites (iteration {state.iteration}) · best act "
                  f"{state.act_K[best]:.3f} at xent {state.xent_K[best]:.3f}: \"{inert(texts[best])}\"")

    def iteration_done(self, state, seconds: float) -> None:
        self.seconds.append(seconds)

    def search_finished(self, result: dict, folder: Path) -> None:
        pass

    def limits(self) -> str:
        """`150 iterations`, or `150 iterations or 2m, whichever comes first` with a time budget."""
        if self.deadline is None:
            return f"{self.total} iterations"
        return f"{self.total} iterations or {self.deadline.describe()}, whichever comes first"

    def status(self, state) -> str:
        later = self.seconds[1:] or self.seconds  # the first iteration compiles
        rate = len(later) / sum(later) if sum(later) > 0 else 0.0
        eta = seconds_left(state.iteration, self.total, self.seconds, self.budget_left())
        tail = f" · ETA {format_budget(round(eta))}" if eta else ""
        act, xent = best_found(state)
        return f"{rate:.1f} it/s · best act {act:.3f} · best xent {xent:.3f}{tail}"

    def budget_left(self) -> float | None:
        return self.deadline.left_s() if self.deadline is not None else None

    def completed(self, iteration: int) -> float:
        """Progress in iterations: the iterations done, or as far as the time budget has gone when it is
        further along (it ends the search sooner)."""
        if self.deadline is None or not self.total:
            return float(iteration)
        spent = min(1.0, self.deadline.spent_s() / self.deadline.seconds)
        return max(float(iteration), spent * self.total)


def best_found(state) -> tuple[float, float]:
    """(highest act, lowest xent) of every prompt the search has kept: its frontier holds both ends, which
    never get worse, while an elite trades act for xent at its λ (the elites' own are the fallback)."""
    frontier = state.frontier
    if len(frontier):
        return float(frontier.act.max()), float(frontier.xent.min())
    return float(state.act_K.max()), float(state.xent_K.min())


def seconds_left(iteration: int, total: int, seconds: list[float], budget_left: float | None) -> float | None:
    """Seconds until the search ends: the iterations left at the mean time of those after the first
    (which compiles), or the time budget left when that ends it sooner; None while unknown (after the
    first iteration without a budget) and once every iteration has run. With a budget and only the first
    iteration timed, the iterations left at its time bound the budget."""
    if iteration >= total:
        return None
    later = seconds[1:]
    per_iteration = sum(later) / len(later) if later else None
    if per_iteration is None and budget_left is not None and seconds:
        per_iteration = seconds[0]  # the compiling iteration is the slowest
    return eta_seconds(total - iteration, per_iteration, budget_left)


class _ProgressLines(_Progress):
    """Progress on stderr that is not a terminal: the first iteration, every tenth of the run (of its
    iterations, and of its time budget), the last."""

    def batch_started(self, features: list[int]) -> None:
        if features:  # none left: batch_skipped said so
            print(f"epo-tui: batch: {len(features)} features here: {', '.join(map(str, features))}",
                  file=sys.stderr, flush=True)

    def search_started(self, label: str, iterations: int, deadline=None, penalty_scale: str = "") -> None:
        super().search_started(label, iterations, deadline, penalty_scale)
        self.budget_tenths = 0
        print(f"epo-tui: {label}: starting, {self.limits()}", file=sys.stderr, flush=True)
        self.penalty_line()

    def iteration_done(self, state, seconds: float) -> None:
        super().iteration_done(state, seconds)
        i, every = state.iteration, max(1, self.total // 10)
        if i == 1 or i % every == 0 or i == self.total or self._budget_tenth():
            print(f"epo-tui: {self.label}: iteration {i}/{self.total} · {self.status(state)}",
                  file=sys.stderr, flush=True)


    def _budget_tenth(self) -> bool:
        """Whether another tenth of the time budget has gone since the last line."""
        if self.deadline is None:
            return False
        tenths = int(10 * self.deadline.spent_s() / self.deadline.seconds)
        passed, self.budget_tenths = tenths > self.budget_tenths, max(tenths, self.budget_tenths)
        return passed


class _ProgressBars(_Progress):
    """rich bars on stderr: features of a batch, and iterations of the current search."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        super().__init__()
        # the ETA is in the status (iterations or the time budget, whichever ends first), and the
        # count is the iterations even when the bar follows the budget
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                             TextColumn("{task.fields[status]}"), console=Console(file=sys.stderr), transient=True)
        self.batch_task = self.task = None

    def __enter__(self):
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def line(self, text: str) -> None:
        self.bars.console.print(text, markup=False, highlight=False, soft_wrap=True)  # above the bars

    def batch_started(self, features: list[int]) -> None:
        self.features_done, self.features_total = 0, len(features)
        self.batch_task = self.bars.add_task("features", total=len(features), status="", count=f"0/{len(features)}")

    def search_started(self, label: str, iterations: int, deadline=None, penalty_scale: str = "") -> None:
        super().search_started(label, iterations, deadline, penalty_scale)
        self.penalty_line()
        if self.task is not None:
            self.bars.remove_task(self.task)
        budget = f" or {self.deadline.describe()}" if self.deadline is not None else ""
        self.task = self.bars.add_task(label, total=iterations, status=f"compiling…{budget}",
                                       count=f"0/{iterations}")

    def iteration_done(self, state, seconds: float) -> None:
        super().iteration_done(state, seconds)
        self.bars.update(self.task, completed=self.completed(state.iteration), count=f"{state.iteration}/{self.total}",
                         status=self.status(state))

    def search_finished(self, result: dict, folder: Path) -> None:
        if self.batch_task is not None:
            self.features_done += 1
            self.bars.update(self.batch_task, completed=self.features_done,
                             count=f"{self.features_done}/{self.features_total}")


def dataset_progress():
    """`epo-tui dataset`'s progress on stderr: a bar with rows done and tokens/s in a terminal (not under
    CI), else one line at the start (the command prints its summary line at the end either way)."""
    return _DatasetBar() if sys.stderr.isatty() and not os.environ.get("CI") else _DatasetLines()


class _DatasetLines:
    """A dataset pass's progress where stderr is not a terminal: a line at the start, notes as lines."""

    def __init__(self):
        self.rows = self.tokens = 0
        self.timed_tokens, self.timed_seconds, self.batches = 0, 0.0, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def line(self, text: str) -> None:
        print(f"epo-tui: dataset: {inert(text)}", file=sys.stderr, flush=True)

    def start(self, rows: int, tokens: int, rows_done: int, tokens_done: int) -> None:
        self.rows, self.tokens = rows, tokens
        self.line(f"{rows:,} rows, {tokens:,} tokens" + (f"; {rows_done:,} rows done before" if rows_done else ""))

    def advance(self, rows_done: int, tokens_read: int, seconds: float) -> None:
        self.batches += 1
        if self.batches > 1:  # the first batch compiles
            self.timed_tokens += tokens_read
            self.timed_seconds += seconds

    def rate(self) -> str:
        """`1,234 tokens/s` over the batches after the first, or `compiling…` before there are any."""
        if not self.timed_seconds:
            return "compiling…"
        return f"{self.timed_tokens / self.timed_seconds:,.0f} tokens/s"


class _DatasetBar(_DatasetLines):
    """A rich bar on stderr: rows done of all, tokens/s, time left."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        super().__init__()
        self.bars = Progress(TextColumn("dataset"), BarColumn(), TextColumn("{task.fields[count]}"),
                             TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                             console=Console(file=sys.stderr), transient=True)
        self.task = None

    def __enter__(self):
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def line(self, text: str) -> None:
        self.bars.console.print(f"epo-tui: dataset: {inert(text)}", markup=False, highlight=False, soft_wrap=True)

    def start(self, rows: int, tokens: int, rows_done: int, tokens_done: int) -> None:
        super().start(rows, tokens, rows_done, tokens_done)
        self.task = self.bars.add_task("dataset", total=rows, completed=rows_done, count=f"{rows_done:,}/{rows:,} rows",
                                       rate=self.rate())

    def advance(self, rows_done: int, tokens_read: int, seconds: float) -> None:
        super().advance(rows_done, tokens_read, seconds)
        self.bars.update(self.task, completed=rows_done, count=f"{rows_done:,}/{self.rows:,} rows", rate=self.rate())

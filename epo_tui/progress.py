"""Progress of headless runs on stderr: rich bars in a terminal, a line now and then in logs.

Both displays implement `epo_tui.engine.runner.Reporter` by duck typing (this module stays free of
the engine and its heavy imports).
"""

from __future__ import annotations

import sys
from pathlib import Path

from epo_tui.text import inert


def progress_reporter():
    """Live bars when stderr is a terminal, else a line now and then (logs stay readable)."""
    return _ProgressBars() if sys.stderr.isatty() else _ProgressLines()


class _Progress:
    """What both progress displays track (implements epo_tui.engine.runner.Reporter)."""

    def __init__(self):
        self.label, self.total, self.seconds = "", 0, []

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

    def search_started(self, label: str, iterations: int) -> None:
        self.label, self.total, self.seconds = label, iterations, []

    def iteration_done(self, state, seconds: float) -> None:
        self.seconds.append(seconds)

    def search_finished(self, result: dict, folder: Path) -> None:
        pass

    def status(self, state) -> str:
        later = self.seconds[1:] or self.seconds  # the first iteration compiles
        rate = len(later) / sum(later) if sum(later) > 0 else 0.0
        return f"{rate:.1f} it/s · best act {state.act_K.max():.3f} · best xent {state.xent_K.min():.3f}"


class _ProgressLines(_Progress):
    """Progress on stderr that is not a terminal: the first iteration, every tenth of the run, the last."""

    def batch_started(self, features: list[int]) -> None:
        print(f"epo-tui: batch: {len(features)} features here: {', '.join(map(str, features))}",
              file=sys.stderr, flush=True)

    def search_started(self, label: str, iterations: int) -> None:
        super().search_started(label, iterations)
        print(f"epo-tui: {label}: starting, {iterations} iterations", file=sys.stderr, flush=True)

    def iteration_done(self, state, seconds: float) -> None:
        super().iteration_done(state, seconds)
        i, every = state.iteration, max(1, self.total // 10)
        if i == 1 or i % every == 0 or i == self.total:
            print(f"epo-tui: {self.label}: iteration {i}/{self.total} · {self.status(state)}",
                  file=sys.stderr, flush=True)


class _ProgressBars(_Progress):
    """rich bars on stderr: features of a batch, and iterations of the current search."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        super().__init__()
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                             console=Console(file=sys.stderr), transient=True)
        self.batch_task = self.task = None

    def __enter__(self):
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def line(self, text: str) -> None:
        self.bars.console.print(text, markup=False, highlight=False, soft_wrap=True)  # above the bars

    def batch_started(self, features: list[int]) -> None:
        self.batch_task = self.bars.add_task("features", total=len(features), status="")

    def search_started(self, label: str, iterations: int) -> None:
        super().search_started(label, iterations)
        if self.task is not None:
            self.bars.remove_task(self.task)
        self.task = self.bars.add_task(label, total=iterations, status="compiling…")

    def iteration_done(self, state, seconds: float) -> None:
        super().iteration_done(state, seconds)
        self.bars.update(self.task, completed=state.iteration, status=self.status(state))

    def search_finished(self, result: dict, folder: Path) -> None:
        if self.batch_task is not None:
            self.bars.advance(self.batch_task)

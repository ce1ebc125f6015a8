"""The trade-off chart: the (xent, act) frontier of every prompt seen, and the best act over iterations.

Progress events can arrive far faster than a terminal can draw a plot, so `add_progress` only merges
data (cheap, bounded) and marks the pane dirty; a timer redraws at most `REDRAWS_PER_S` times a second.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from textual.app import ComposeResult
from textual.containers import Vertical
from textual_plotext import PlotextPlot

from epo_tui import protocol
from epo_tui.pareto import ParetoFrontier
from epo_tui.themes import Theme

REDRAWS_PER_S = 4
HISTORY_MAX_POINTS = 5000
HISTORY_MIN_PANE_HEIGHT = 16  # rows; below this the frontier plot alone is more readable

Colour = str | tuple[int, int, int]  # a plotext colour: a name or RGB


class PlotPoint(NamedTuple):
    """A point of the chart: a prompt's (xent, act), the iteration it was seen at, its text."""

    xent: float
    act: float
    iteration: int
    text: str


class BestHistory:
    """The best act per progress event, bounded: past `max_points`, neighbouring pairs merge (later
    iteration, max act) and later values are bucketed likewise, so peaks survive the decimation."""

    def __init__(self, max_points: int = HISTORY_MAX_POINTS) -> None:
        self.max_points = max_points
        self.clear()

    def clear(self) -> None:
        self.iterations: list[int] = []
        self.values: list[float] = []
        self._stride = 1  # progress events per kept point
        self._bucket: list[tuple[int, float]] = []

    def __len__(self) -> int:
        return len(self.values)

    def add(self, iteration: int, value: float) -> None:
        """Adds the best act of `iteration`; a second value for the newest iteration merges by max."""
        if not math.isfinite(value):
            return
        if self._bucket and self._bucket[-1][0] == iteration:
            self._bucket[-1] = (iteration, max(self._bucket[-1][1], value))
            return
        if not self._bucket and self.iterations and self.iterations[-1] == iteration:
            self.values[-1] = max(self.values[-1], value)
            return
        self._bucket.append((iteration, value))
        if len(self._bucket) < self._stride:
            return
        self.iterations.append(self._bucket[-1][0])
        self.values.append(max(v for _, v in self._bucket))
        self._bucket.clear()
        if len(self.values) > self.max_points:
            self.iterations = self.iterations[1::2]
            self.values = [max(pair) for pair in zip(self.values[0::2], self.values[1::2])]
            self._stride *= 2

    def series(self) -> tuple[list[int], list[float]]:
        """(iterations, values) to plot, including the partly filled bucket."""
        if not self._bucket:
            return self.iterations, self.values
        return (self.iterations + [self._bucket[-1][0]], self.values + [max(v for _, v in self._bucket)])


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def best_act(elites: list[protocol.Elite], best_objective: float | None) -> float:
    """The best act of an iteration: the elites' max act, else `best_objective` (NaN when neither)."""
    if elites:
        return max(e.act for e in elites)
    return math.nan if best_objective is None else best_objective


class FrontierPane(Vertical):
    """Two plots: the frontier scatter (current elites marked) above the best act per iteration."""

    DEFAULT_CSS = """
    FrontierPane { height: 1fr; }
    FrontierPane > #frontier-plot { height: 2fr; }
    FrontierPane > #history-plot { height: 1fr; min-height: 5; }
    """

    def __init__(self, theme: Theme | None = None, *, name: str | None = None, id: str | None = None,  # noqa: A002
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.frontier = ParetoFrontier()
        self.history = BestHistory()
        self.elite_points: list[tuple[float, float]] = []  # (xent, act) of the current elites
        self.dataset_max: float | None = None  # the searched latent's dataset maximum: a line on the chart
        self.redraws = 0  # how many times the plots were rebuilt (tests check the throttle)
        self._dirty = True
        colours = theme.colours if theme else {}
        self._frontier_colour: Colour = _rgb(colours["primary"]) if "primary" in colours else "cyan"
        self._elite_colour: Colour = _rgb(colours["accent"]) if "accent" in colours else "orange"
        self._dataset_colour: Colour = _rgb(colours["warning"]) if "warning" in colours else "red"

    def compose(self) -> ComposeResult:
        yield PlotextPlot(id="frontier-plot")
        yield PlotextPlot(id="history-plot")

    def on_mount(self) -> None:
        self.set_interval(1 / REDRAWS_PER_S, self._redraw_if_dirty)
        self._redraw_if_dirty()

    def on_resize(self) -> None:
        """A short pane (an 80x24 terminal) gives all its rows to the frontier, dropping the history plot."""
        self.query_one("#history-plot").display = self.size.height >= HISTORY_MIN_PANE_HEIGHT

    def set_dataset_max(self, value: float | None) -> None:
        """Draws the latent's dataset maximum as a horizontal line (None: no line); elites above it are
        marked apart."""
        if value != self.dataset_max:
            self.dataset_max = value
            self._dirty = True

    def reset(self) -> None:
        """Forgets everything (a new search starts)."""
        self.frontier.clear()
        self.history.clear()
        self.elite_points = []
        self._dirty = True

    def add_progress(self, event: protocol.Progress) -> None:
        """Merges a `progress` event (or a coalesced one): its new frontier points, elites and best act."""
        self.add(event.iteration, event.frontier_new, event.elites, event.best_objective)

    def add(self, iteration: int, new_points: list[protocol.FrontierPoint], elites: list[protocol.Elite],
            best_objective: float | None = None) -> None:
        """Merges one iteration: the points that entered the frontier, the elites, the best act.

        The best act of each iteration named by a new frontier point is kept too, so a coalesced event
        (several iterations in one) draws the same history as the events one by one."""
        best_of: dict[int, float] = {}
        for p in new_points:
            self.frontier.add(PlotPoint(p.xent, p.act, p.iteration, p.text))
            if math.isfinite(p.act):
                best_of[p.iteration] = max(best_of.get(p.iteration, -math.inf), p.act)
        for e in elites:  # elites were seen too, and their act (not objective) is what is plotted
            self.frontier.add(PlotPoint(e.xent, e.act, iteration, e.text))
        self.elite_points = [(e.xent, e.act) for e in elites]
        best = best_act(elites, best_objective)
        if math.isfinite(best):
            best_of[iteration] = max(best_of.get(iteration, -math.inf), best)
        for it in sorted(best_of):
            self.history.add(it, best_of[it])
        self._dirty = True

    def show_saved(self, points: list[protocol.FrontierPoint], elites: list[protocol.Elite]) -> None:
        """Shows a saved session: its recorded frontier points (from history) and its final elites."""
        self.reset()
        by_iteration: dict[int, list[protocol.FrontierPoint]] = {}
        for p in points:
            by_iteration.setdefault(p.iteration, []).append(p)
        for iteration in sorted(by_iteration):
            self.add(iteration, by_iteration[iteration], [], max(p.act for p in by_iteration[iteration]))
        self.add(max(by_iteration, default=0), [], elites)

    def _redraw_if_dirty(self) -> None:
        if self._dirty:
            self._dirty = False
            self.redraw()

    def redraw(self) -> None:
        """Rebuilds both plots from the kept data (called by the timer, not per event)."""
        self.redraws += 1
        scatter = self.query_one("#frontier-plot", PlotextPlot)
        plt = scatter.plt
        plt.clear_data()
        title = f"frontier ({len(self.frontier)} points)" if len(self.frontier) else "frontier: no search yet"
        top = self.dataset_max
        plt.title(title + (f" · line: dataset max {top:.3g}" if top is not None else ""))
        plt.xlabel("xent (lower: more fluent)")
        plt.ylabel("act")
        points = self.frontier.points
        if points:
            plt.scatter([p.xent for p in points], [p.act for p in points], marker="dot",
                        color=self._frontier_colour, label="frontier")
        above = [p for p in self.elite_points if top is not None and p[1] > top]
        below = [p for p in self.elite_points if p not in above]
        if below:
            plt.scatter([x for x, _ in below], [y for _, y in below], marker="x", color=self._elite_colour,
                        label="elites")
        if above:
            plt.scatter([x for x, _ in above], [y for _, y in above], marker="star", color=self._elite_colour,
                        label="elites above the dataset")
        if top is not None:
            plt.horizontal_line(top, color=self._dataset_colour)
        scatter.refresh()

        history = self.query_one("#history-plot", PlotextPlot)
        plt = history.plt
        plt.clear_data()
        plt.xlabel("iteration")
        plt.ylabel("best act")
        iterations, values = self.history.series()
        if values:
            plt.plot(iterations, values, marker="braille", color=self._elite_colour)
        history.refresh()

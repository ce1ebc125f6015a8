"""The elites table, the frontier chart and the token colouring they share (epo_tui.tui)."""

from __future__ import annotations

import asyncio
import io
import random
import time
from dataclasses import replace

import pytest
from rich.color import Color, ColorSystem
from rich.console import Console
from rich.style import Style
from rich.text import Span
from textual.app import App, ComposeResult

from epo_tui import paths, protocol
from epo_tui.protocol import Elite, Progress
from epo_tui.themes import load_theme_file
from epo_tui.tui.components.elites import ElitesPane
from epo_tui.pareto import FRONTIER_MAX_POINTS, ParetoFrontier
from epo_tui.tui.components.frontier import REDRAWS_PER_S, BestHistory, FrontierPane
from epo_tui.tui.components.frontier import PlotPoint
from epo_tui.tui.tokens import activation_text, legend

THEMES = sorted(paths.shipped_dir("themes").glob("*.toml"))
DARK = load_theme_file(paths.shipped_dir("themes") / "dark.toml")
BOS = "<|endoftext|>"


def make_elite(k: int, prompt: list[str], acts: list[float], xent: float) -> Elite:
    """An elite as PROTOCOL.md has it: tokens/activations cover BOS, the prompt starts at 1."""
    return Elite(penalty=[1.0, 2.0, 5.0, 20.0][k % 4] * (1 + k // 4), token_ids=list(range(len(prompt) + 1)),
                 tokens=[BOS, *prompt], activations=[50.0, *acts], act=acts[-1], xent=xent,
                 objective=acts[-1] - 1.0, prompt_start=1, text="".join(prompt))


def make_progress(iteration: int, elites: list[Elite], frontier_new: list[protocol.FrontierPoint] | None = None
                  ) -> Progress:
    return Progress(session="s", iteration=iteration, iterations_total=10_000, it_per_s=5.0, elites=elites,
                    frontier_new=frontier_new or [], best_objective=max(e.objective for e in elites))


def point(iteration: int, xent: float, act: float) -> protocol.FrontierPoint:
    return protocol.FrontierPoint(iteration=iteration, xent=xent, objective=0.0, act=act, token_ids=[1], text="t")


def plain_of(renderable, width: int = 120) -> str:
    console = Console(width=width, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.file.getvalue()


# -- tokens


def test_activation_text_colours_prompt_tokens_only_and_keeps_escapes_inert():
    tokens = [BOS, "Hi", " \x1b[31mred", " zero", " neg"]
    text = activation_text(tokens, [9.0, 2.0, 4.0, 0.0, -1.0], 1, DARK)
    assert text.plain == "Hi \\x1b[31mred zero neg"  # BOS left out; the escape shows, never acts
    assert "\x1b" not in text.plain
    white, scale = DARK.activation_text, DARK.activation_scale
    # the scale tops out at this prompt's max (4.0), not at BOS's 9.0; 0 and -1 stay plain
    assert text.spans == [Span(0, 2, Style(color=white, bgcolor=scale[round(0.5 * (len(scale) - 1))])),
                          Span(2, 14, Style(color=white, bgcolor=scale[-1]))]


def test_activation_text_with_a_shared_scale_and_nothing_firing():
    text = activation_text(["a", "b"], [1.0, 10.0], 0, DARK, scale_max=20.0)
    assert [s.style.bgcolor.name for s in text.spans] == [DARK.activation_colour(0.05), DARK.activation_colour(0.5)]
    quiet = activation_text([BOS, "x", "y"], [3.0, 0.0, float("nan")], 1, DARK)
    assert quiet.plain == "xy" and quiet.spans == []


def test_legend_shows_every_colour_between_zero_and_the_max():
    text = legend(DARK, 12.3)
    assert text.plain == "0 " + "▇" * len(DARK.activation_scale) + " 12.3"
    assert [s.style.color.name for s in text.spans] == list(DARK.activation_scale)


@pytest.mark.parametrize("path", THEMES, ids=lambda p: p.stem)
def test_scale_colours_stay_distinct_in_256_colour_terminals(path):
    scale = load_theme_file(path).activation_scale
    downgraded = [Color.parse(c).downgrade(ColorSystem.EIGHT_BIT).number for c in scale]
    assert len(set(downgraded)) == len(scale), downgraded


# -- frontier data


def brute_force_front(points: list[tuple[float, float]]) -> set[tuple[float, float]]:
    return {p for p in points
            if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)}


def test_pareto_frontier_keeps_exactly_the_non_dominated_set():
    rng = random.Random(0)
    points = [(rng.uniform(0, 10), rng.uniform(0, 10)) for _ in range(2000)]
    frontier = ParetoFrontier()
    for i, (x, a) in enumerate(points):
        frontier.add(PlotPoint(x, a, i, ""))
    assert {(p.xent, p.act) for p in frontier.points} == brute_force_front(points)
    assert not frontier.add(PlotPoint(frontier.points[0].xent, frontier.points[0].act, 0, ""))  # a repeat


def test_pareto_frontier_replaces_a_point_at_the_same_xent():
    frontier = ParetoFrontier()
    frontier.add(PlotPoint(1.0, 1.0, 0, "a"))
    frontier.add(PlotPoint(1.0, 2.0, 1, "b"))
    assert [p.text for p in frontier.points] == ["b"]


def test_pareto_frontier_stays_bounded_and_non_dominated_on_a_dense_front():
    rng = random.Random(1)
    frontier = ParetoFrontier()
    for i in range(10_000):  # every point on an increasing curve: all non-dominated
        x = rng.uniform(0, 10)
        frontier.add(PlotPoint(x, x ** 0.5, i, ""))
    kept = frontier.points
    assert 100 < len(kept) <= FRONTIER_MAX_POINTS
    xs = [p.xent for p in kept]
    assert xs == sorted(xs) and all(a.act < b.act for a, b in zip(kept, kept[1:]))


def test_best_history_stays_bounded_and_keeps_the_peak():
    history = BestHistory(max_points=100)
    for i in range(5000):
        history.add(i, 100.0 if i == 1234 else float(i % 7))
    iterations, values = history.series()
    assert len(values) <= 101 and max(values) == 100.0 and iterations == sorted(iterations)


# -- the panes in an app


class PanesApp(App):
    def __init__(self):
        super().__init__()
        self.selected: list[tuple[int, dict]] = []

    def compose(self) -> ComposeResult:
        yield ElitesPane(DARK, id="elites")
        yield FrontierPane(DARK, id="frontier")

    def on_elites_pane_selected(self, message: ElitesPane.Selected) -> None:
        self.selected.append((message.index, message.elite))


def three_elites(step: int) -> list[Elite]:
    return [make_elite(k, [" the", " cat", f" {step}"], [0.0, 1.0 + k, 2.0 + k + step], 3.0 + k) for k in range(3)]


def row_texts(table) -> list[list[str]]:
    return [[getattr(c, "plain", str(c)) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_elites_pane_rows_cursor_selection_and_details():
    asyncio.run(_elites_scenario())


async def _elites_scenario():
    app = PanesApp()
    async with app.run_test(size=(120, 40)) as pilot:
        pane = app.query_one(ElitesPane)
        assert pane.selected_elite is None and plain_of(pane.details()).strip() == "no search yet"
        assert "no search yet" in str(pane.query_one("#elites-legend").render())

        pane.update_elites(three_elites(0))
        await pilot.pause()
        assert row_texts(pane.table) == [["1", "2", "3", " the cat 0"], ["2", "3", "4", " the cat 0"],
                                         ["5", "4", "5", " the cat 0"]]
        assert "activation 0 ▇▇▇▇▇▇ 4" in str(pane.query_one("#elites-legend").render())
        assert app.selected[-1][0] == 0  # the first elites bring a selection

        pane.table.focus()
        await pilot.press("down", "down")
        await pilot.pause()
        assert [i for i, _ in app.selected[-2:]] == [1, 2]
        assert app.selected[-1][1] is pane.selected_elite

        seen = len(app.selected)
        pane.update_elites(three_elites(7))  # a progress event: same rows, new values
        await pilot.pause()
        assert pane.table.cursor_row == 2 and len(app.selected) == seen  # cursor kept, no message
        assert row_texts(pane.table)[2] == ["5", "11", "5", " the cat 7"]
        assert pane.selected_elite.act == 11.0

        details = plain_of(pane.details())
        assert "elite 2" in details and "act 11" in details and "xent 5" in details
        rows = [line.split() for line in details.splitlines()[2:] if line.strip()]
        assert rows == [["0", "the", "0"], ["1", "cat", "3"], ["2", "7", "11"]]  # pos | token | act
        assert BOS not in details
        pane.penalty_scale = "λ = 1 prices a nat at 0.751 (a tenth of the dataset maximum, 7.51)"  # a started event's
        assert plain_of(pane.details()).splitlines()[1] == pane.penalty_scale  # under the header, over the table

        pane.update_elites([])
        await pilot.pause()
        assert pane.selected_elite is None and not pane.table.display


def test_frontier_pane_merges_events_and_redraws_at_a_bounded_rate():
    asyncio.run(_frontier_scenario())


async def _frontier_scenario():
    app = PanesApp()
    async with app.run_test(size=(120, 40)) as pilot:
        pane = app.query_one(FrontierPane)
        await pilot.pause()
        before = pane.redraws
        rng = random.Random(2)
        start = time.monotonic()
        events = 300
        best_of = {}  # per iteration: the best act among its new points and its elites
        for i in range(1, events + 1):
            new = [point(i, rng.uniform(0, 10), rng.uniform(0, 10)) for _ in range(34)]  # ~10,000 points in all
            best_of[i] = max([p.act for p in new] + [e.act for e in three_elites(i % 5)])
            pane.add_progress(make_progress(i, three_elites(i % 5), new))
            await asyncio.sleep(0.001)
        elapsed = time.monotonic() - start
        await pilot.pause(2 / REDRAWS_PER_S)
        redraws = pane.redraws - before
        assert 1 <= redraws <= (elapsed + 2 / REDRAWS_PER_S) * REDRAWS_PER_S + 2 and redraws < events / 10
        assert len(pane.frontier) <= FRONTIER_MAX_POINTS
        kept = [(p.xent, p.act) for p in pane.frontier.points]
        assert all(not (q[0] <= p[0] and q[1] >= p[1]) for p in kept for q in kept if q != p)
        assert len(pane.history) == events and pane.history.values == [best_of[i] for i in range(1, events + 1)]
        assert pane.elite_points == [(3.0 + k, 2.0 + k + events % 5) for k in range(3)]

        pane.reset()
        assert len(pane.frontier) == 0 and len(pane.history) == 0
        await pilot.pause(2 / REDRAWS_PER_S)


def test_elites_given_before_the_pane_is_mounted_show_once_it_is():
    class EarlyApp(App):
        def compose(self) -> ComposeResult:
            pane = ElitesPane(DARK)
            pane.update_elites(three_elites(1))
            yield pane

    async def scenario():
        app = EarlyApp()
        async with app.run_test() as pilot:
            await pilot.pause()
            pane = app.query_one(ElitesPane)
            assert pane.table.row_count == 3 and pane.selected_elite.act == 3.0

    asyncio.run(scenario())


def test_a_coalesced_event_draws_the_same_frontier_and_history_as_its_parts():
    rng = random.Random(5)
    events = []
    for i in range(1, 7):
        new = [point(i, rng.uniform(0, 10), rng.uniform(0, 10)) for _ in range(5)]
        elites = [make_elite(0, ["t"], [p.act], p.xent) for p in new[:2]]  # elites are seen points
        events.append(make_progress(i, elites, new))
    one_by_one, coalesced = FrontierPane(), FrontierPane()
    for event in events:
        one_by_one.add_progress(event)
    coalesced.add_progress(replace(events[-1], frontier_new=[p for e in events for p in e.frontier_new]))
    assert one_by_one.frontier.points == coalesced.frontier.points
    assert one_by_one.history.series() == coalesced.history.series()

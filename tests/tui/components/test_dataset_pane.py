"""The dataset beside the search: the chosen latent's examples and maximum (the dataset pane), the
maximum as the frontier's line with the elites above it marked, the status bar's ratio, and one colour
scale for elites and examples; a latent without statistics hides the pane."""

from __future__ import annotations

import asyncio

import pytest
from rich.style import Style

from epo_tui.dataset_stats import Example
from epo_tui.tui.components.dataset import DatasetPane, example_window
from epo_tui.tui.components.elites import ElitesPane
from epo_tui.tui.components.features import ORDERS, FeaturePane
from epo_tui.tui.components.frontier import FrontierPane
from epo_tui.tui.components.status import StatusBar
from tui_pilot import FAKE_DATASET_MAX, fake_app, ready, search_until, until, write_fake_dataset


@pytest.fixture(autouse=True)
def own_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def test_an_examples_window_keeps_the_context_before_its_strongest_token():
    example = Example.of([f"t{i}" for i in range(30)], [0.0] * 20 + [5.0] + [0.0] * 9)
    tokens, values = example_window(example)
    assert tokens == [f"t{i}" for i in range(8, 25)] and values[12] == 5.0


def _pane_text(app) -> str:
    return "\n".join(line.plain for line in app.query_one(DatasetPane).lines())


def _on_the_fake_worker(scenario, with_dataset: bool = True, ending: str | None = None):
    """`scenario(pilot, app)`'s return value, run on the fake worker's app (with the fake dataset
    statistics written first, and shown, unless `with_dataset` is False; `ending` as fake_app's); q ends
    the app."""
    if with_dataset:
        write_fake_dataset()
    app = fake_app(ending)

    async def main():
        async with app.run_test(size=(120, 40)) as pilot:
            await ready(pilot)
            if with_dataset:
                await until(pilot, lambda: app.query_one(DatasetPane).display, "the dataset pane")
            outcome = await scenario(pilot, app)
            await pilot.press("q")
        return outcome

    return asyncio.run(main())


def test_the_chosen_latents_dataset_beside_the_search():
    async def scenario(pilot, app):
        before = _pane_text(app)
        assert app.query_one(FrontierPane).dataset_max == FAKE_DATASET_MAX
        await search_until(pilot, 5)
        elites, frontier, pane = app.query_one(ElitesPane), app.query_one(FrontierPane), app.query_one(DatasetPane)
        return (before, str(app.query_one(StatusBar).line_text()),
                [a for _, a in frontier.elite_points if a > FAKE_DATASET_MAX], (elites.scale_max, pane.scale_max))

    before, status, above, scales = _on_the_fake_worker(scenario)
    assert before.startswith("latent 24: dataset max 2.2 · fires on 0.81% of tokens · neuronpedia")
    assert "2.2  The Debian project ships packages" in before and "1.1  apt install on Ubuntu" in before
    # the fake worker's best elite at iteration 5: act 2.6 at xent 4.25
    assert "best 1.18× dataset max at xent 4.2" in status
    assert sorted(above) == [2.4, 2.6]
    assert scales[0] == scales[1] == pytest.approx(2.6)


def test_a_latent_without_statistics_hides_the_pane_and_the_line():
    async def scenario(pilot, app):
        await pilot.press("g", *"30", "enter")  # go to latent 30, which has no statistics
        await pilot.pause(0.2)
        await pilot.press("enter")  # choose it
        await until(pilot, lambda: app.chosen.index == 30, "latent 30 chosen")
        return (app.query_one(DatasetPane).display, app.query_one(FrontierPane).dataset_max,
                app.query_one(ElitesPane).scale_floor)

    assert _on_the_fake_worker(scenario) == (False, None, 0.0)


def test_after_a_search_the_line_stays_with_its_frontier_while_another_latent_is_chosen():
    async def scenario(pilot, app):
        await search_until(pilot, 5)
        await until(pilot, lambda: app.state == "idle", "the search's end")
        await pilot.press("g", *"30", "enter")
        await pilot.pause(0.2)
        await pilot.press("enter")  # latent 30, without statistics, for the next search
        await until(pilot, lambda: app.chosen.index == 30, "latent 30 chosen")
        return app.query_one(DatasetPane).display, app.query_one(FrontierPane).dataset_max

    # the pane follows the choice; the line belongs to the frontier on screen, latent 24's
    assert _on_the_fake_worker(scenario, ending="finish") == (False, FAKE_DATASET_MAX)


def test_without_any_statistics_the_screen_is_as_before():
    async def scenario(pilot, app):
        await search_until(pilot, 5)
        return (app.query_one(DatasetPane).display, app.query_one(FrontierPane).dataset_max,
                str(app.query_one(StatusBar).line_text()))

    shown, line, status = _on_the_fake_worker(scenario, with_dataset=False)
    assert not shown and line is None and "dataset" not in status


def test_the_feature_list_shows_dataset_figures_and_orders_by_them():
    async def scenario(pilot, app):
        pane = app.query_one(FeaturePane)
        row = pane.row_text(pane.rows.index(pane.search.position[24]), 60, lambda _: Style()).plain
        orders = {}
        for _ in ORDERS:
            orders[pane.order] = [e.index for e in pane.shown[:3]]
            count = str(pane.query_one("#feature-count").render())
            await pilot.press("ctrl+o")
        return row, orders, count

    row, orders, count = _on_the_fake_worker(scenario)
    assert row.startswith("     24     2.2  0.81% (no label) ")  # mark, index, star, max, density
    # latent 7 fires on 20% of tokens, 24 on 0.81%; the others have no density (none from the fake SAE)
    assert orders == {"relevance": [0, 1, 2], "index": [0, 1, 2], "density": [7, 24, 0],
                      "dataset max": [24, 0, 1]}
    assert "by dataset max" in count


def test_a_favorite_records_its_ratio_to_the_dataset_maximum():
    from epo_tui import favorites

    async def scenario(pilot, app):
        await search_until(pilot, 5)
        await pilot.press("f")  # the selected elite: the first, act 2.0 at iteration 5
        path = favorites.favorites_path(app.config)
        await until(pilot, lambda: path.exists() and favorites.read_favorites(path), "the favorite")
        return path.read_text()

    text = _on_the_fake_worker(scenario)
    assert "- act 2.000 (0.91× the dataset maximum) · xent 5.750 · λ 1.00" in text.splitlines()

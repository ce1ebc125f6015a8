"""The feature pane driven by a pilot: typing filters, `#N` jumps, enter chooses, `*` stars and `n`
notes (both saved), `r` picks an alive latent, space+space+c asks to combine, labels import; and the
search over a 24,576-latent catalog stays instant."""

from __future__ import annotations

import asyncio
import random

from textual.app import App, ComposeResult
from textual.fuzzy import FuzzySearch

from epo_tui.features import FeatureEntry
from epo_tui.labels import write_explanations
from epo_tui.stars import Stars
from epo_tui.tui.components.features import MATCHER_LIMIT, FeatureList, FeaturePane, FuzzyFeatureSearch

LABELS = {3: "French words", 12: "Python code", 120: "dogs and cats", 7: "numbers in tables"}


def _entries(count: int = 200) -> list[FeatureEntry]:
    return [FeatureEntry(index=i, top_tokens=(f" tok{i}", " the"), top_token_ids=(i, 1), label=LABELS.get(i))
            for i in range(count)]


class PaneApp(App):
    def __init__(self, stars: Stars, alive: set[int] | None = None, seed: int = 0):
        super().__init__()
        self.stars, self.alive, self.seed = stars, alive, seed
        self.chosen: list[FeatureEntry] = []
        self.combined: list[list[FeatureEntry]] = []

    def compose(self) -> ComposeResult:
        yield FeaturePane(alive=self.alive, rng=random.Random(self.seed), id="features")

    def on_mount(self) -> None:
        self.query_one(FeaturePane).set_features(_entries(), self.stars)

    def on_feature_pane_chosen(self, message: FeaturePane.Chosen) -> None:
        self.chosen.append(message.entry)

    def on_feature_pane_combine(self, message: FeaturePane.Combine) -> None:
        self.combined.append(message.entries)


def _run(app: PaneApp, scenario) -> None:
    async def main():
        async with app.run_test(size=(100, 24)) as pilot:
            await scenario(pilot, app.query_one(FeaturePane))

    asyncio.run(main())


def _shown(pane: FeaturePane) -> list[int]:
    return [e.index for e in pane.shown]


def _screen_text(pane: FeaturePane) -> str:
    feature_list = pane.query_one(FeatureList)
    return "\n".join(feature_list.render_line(y).text for y in range(feature_list.size.height))


def test_typing_filters_and_enter_chooses(tmp_path):
    app = PaneApp(Stars.load("sae", tmp_path / "stars.json"))

    async def scenario(pilot, pane):
        assert len(pane.shown) == 200
        pane.focus_search()
        await pilot.press(*"dogs")
        assert _shown(pane) == [120]
        assert "dogs and cats" in _screen_text(pane)
        first_row = pane.query_one(FeatureList).render_line(0)
        assert "dogs" in "".join(seg.text for seg in first_row if seg.style and seg.style.underline)  # matches
        await pilot.press("enter")  # to the list
        assert isinstance(app.focused, FeatureList)
        await pilot.press("enter")  # chooses
        await pilot.pause()
        assert [e.index for e in app.chosen] == [120]

        pane.focus_search()
        await pilot.press("ctrl+a", "ctrl+k", *"pyth cod")  # two words, each must match
        assert _shown(pane) == [12]
        await pilot.press("ctrl+a", "ctrl+k", *"frnch")  # letters in order: a typo still finds it
        assert _shown(pane)[0] == 3
        await pilot.press("ctrl+a", "ctrl+k", *"tok19")
        assert _shown(pane)[:2] == [19, 190]
        await pilot.press("ctrl+a", "ctrl+k")
        assert len(pane.shown) == 200
        await pilot.press("down")  # from the search box to the list
        assert isinstance(app.focused, FeatureList)

    _run(app, scenario)


def test_hash_number_ranks_first_and_enter_jumps(tmp_path):
    app = PaneApp(Stars.load("sae", tmp_path / "stars.json"))

    async def scenario(pilot, pane):
        pane.focus_search()
        await pilot.press(*"#12")
        assert _shown(pane) == [12, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129]
        await pilot.press("enter")
        assert pane.highlighted.index == 12 and isinstance(app.focused, FeatureList)
        assert len(pane.shown) == 200  # the jump clears the search; the cursor sits on 12
        await pilot.press("enter")
        await pilot.pause()
        assert [e.index for e in app.chosen] == [12]

        await pilot.press("g", *"150", "enter")  # g asks for an index
        assert pane.highlighted.index == 150
        pane.focus_search()
        await pilot.press(*"7")  # a bare number: that index first, then the rest that hold it
        assert _shown(pane)[:2] == [7, 70]

    _run(app, scenario)


def test_star_and_note_are_saved(tmp_path):
    path = tmp_path / "stars.json"
    app = PaneApp(Stars.load("sae", path))

    async def scenario(pilot, pane):
        pane.query_one(FeatureList).focus()
        await pilot.press("down", "down", "asterisk")
        assert Stars.load("sae", path).starred() == {2}
        assert "★" in _screen_text(pane).splitlines()[2]
        await pilot.press("n")
        await pilot.pause()
        await pilot.press(*"looks dead", "enter")
        await pilot.pause()
        assert Stars.load("sae", path).note(2) == "looks dead"
        await pilot.press("asterisk")
        assert Stars.load("sae", path).starred() == set()
        await pilot.press("n")
        await pilot.pause()
        await pilot.press(*"xyz", "escape")  # escape cancels
        await pilot.pause()
        assert Stars.load("sae", path).note(2) == "looks dead"

    _run(app, scenario)


def test_random_picks_an_alive_feature(tmp_path):
    alive = {5, 77, 150}
    app = PaneApp(Stars.load("sae", tmp_path / "stars.json"), alive=alive | {9999}, seed=3)

    async def scenario(pilot, pane):
        pane.query_one(FeatureList).focus()
        picked = []
        for _ in range(6):
            await pilot.press("r")
            picked.append(pane.highlighted.index)
        assert set(picked) <= alive and len(set(picked)) > 1
        expected = random.Random(3)
        assert picked == [expected.choice(sorted(alive)) for _ in range(6)]

    _run(app, scenario)


def test_dead_latents_show_struck_through_and_the_count_says_how_many_fire(tmp_path):
    app = PaneApp(Stars.load("sae", tmp_path / "stars.json"))

    async def scenario(pilot, pane):
        count = pane.query_one("#feature-count")
        assert "alive" not in str(count.render())  # no record: nothing claimed
        pane.set_alive(set(range(200)) - {1, 3})
        await pilot.pause()
        assert str(count.render()).startswith("200 of 200 features · 198 alive")
        feature_list = pane.query_one(FeatureList)
        for y, dead in ((0, False), (1, True), (2, False), (3, True)):
            index_segments = [seg for seg in feature_list.render_line(y) if seg.text.strip() == str(y)]
            assert [bool(seg.style.strike) for seg in index_segments] == [dead], y

    _run(app, scenario)


def test_space_marks_two_and_c_combines(tmp_path):
    app = PaneApp(Stars.load("sae", tmp_path / "stars.json"))

    async def scenario(pilot, pane):
        pane.query_one(FeatureList).focus()
        await pilot.press("plus")  # nothing marked: only a hint
        await pilot.press("down", "space", "down", "down", "space")
        assert pane.marked == [1, 3]
        assert _screen_text(pane).splitlines()[1].startswith("●")
        await pilot.press("plus")
        await pilot.pause()
        assert [[e.index for e in pair] for pair in app.combined] == [[1, 3]]
        await pilot.press("down", "space")  # a third mark drops the oldest
        assert pane.marked == [3, 4]

    _run(app, scenario)


def test_import_labels_from_a_neuronpedia_export(tmp_path):
    export = tmp_path / "labels.jsonl.gz"
    write_explanations(export, [{"modelId": "m", "layer": "l", "index": "50", "description": "rockets"},
                                {"modelId": "m", "layer": "l", "index": "9999", "description": "absent"}])
    app = PaneApp(Stars.load("sae", tmp_path / "stars.json"))

    async def scenario(pilot, pane):
        assert pane.import_labels(export) == 1
        pane.focus_search()
        await pilot.press(*"rocket")
        assert _shown(pane) == [50]
        assert pane.entries[50].label == "rockets"

    _run(app, scenario)


def test_filtering_a_full_size_catalog_scores_a_bounded_number_of_latents(monkeypatch):
    """The fuzzy scorer (~7 µs a latent) runs on at most MATCHER_LIMIT matches per word, whatever the
    catalog's size, so typing stays instant on a 24k catalog (the time itself is `epo-tui bench --ui`'s)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(3000)]
    entries = [FeatureEntry(index=i, top_tokens=tuple(" " + rng.choice(words) for _ in range(10)),
                            top_token_ids=tuple(range(10)),
                            label="mentions of " + " ".join(rng.choice(words) for _ in range(5)))
               for i in range(24_576)]
    search = FuzzyFeatureSearch(entries)
    scored = []
    real_match = FuzzySearch.match
    monkeypatch.setattr(FuzzySearch, "match", lambda self, query, candidate: scored.append(1) or real_match(
        self, query, candidate))
    for query in ("the", "men", "xqz", "a", "#12", "mentions of"):
        scored.clear()
        found = search.filter(query)
        assert len(scored) <= MATCHER_LIMIT * len(query.split()), query
        if query == "mentions of":  # every latent matches: ranked cheaply, all of them found
            assert len(found) == len(entries) and not scored

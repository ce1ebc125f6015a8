"""The feature search's relevance (epo_tui.feature_search), for the CLI's `features --search` and the UI's
list alike: the query as the label comes first, then as a top token, then as whole words, then as a word
start, then anywhere; the UI only reorders within a tier by its fuzzy score."""

from __future__ import annotations

import json

import pytest

from cli_run import run_cli
from epo_tui.feature_search import FeatureSearch, search_features
from epo_tui.features import FeatureEntry
from epo_tui.tui.components.features import FuzzyFeatureSearch


def _entry(index: int, label: str | None, *tokens: str) -> FeatureEntry:
    tokens = tokens or (" x", " y")
    return FeatureEntry(index=index, top_tokens=tuple(tokens), top_token_ids=tuple(range(len(tokens))), label=label)


# lowest index first, least relevant first: an index order alone would give the reverse
CATALOG = [
    _entry(0, "undebianized builds"),  # inside a word
    _entry(1, "debianized builds"),  # starts a word
    _entry(2, '"build" — e.g. "a Debian [build]"'),  # a whole word, late in the label
    _entry(3, "kernels", " apt", " debian"),  # a top token
    _entry(4, '"Debian" — e.g. "the [Debian] project"'),  # the label
]


@pytest.mark.parametrize("search_class", [FeatureSearch, FuzzyFeatureSearch])
def test_the_query_as_the_label_comes_first_then_a_token_whole_words_a_word_start_anywhere(search_class):
    search = search_class(CATALOG)
    assert [CATALOG[p].index for p in search.filter("Debian")] == [4, 3, 2, 1, 0]
    assert [CATALOG[p].index for p in search.filter("debian")] == [4, 3, 2, 1, 0]  # any case


def test_within_a_tier_the_label_before_the_tokens_then_the_index():
    entries = [_entry(0, "kernel tokens", " debian"), _entry(1, "debian first", " z"),
               _entry(2, "mostly debian", " z")]
    assert [e.index for e in search_features(entries, "debian")] == [0, 1, 2]  # a token (tier 1) first
    entries = [_entry(0, "tokens", " a", " debian x"), _entry(1, "then debian", " z"), _entry(2, "debian", " q")]
    assert [e.index for e in search_features(entries, "debian")] == [2, 1, 0]  # label, earlier, later


def test_several_words_each_whole_rank_above_a_word_start():
    entries = [_entry(0, "package managers"), _entry(1, "the package manager")]
    assert [e.index for e in search_features(entries, "package manager")] == [1, 0]


def test_a_relabelled_latent_is_ranked_by_its_new_label():
    search = FeatureSearch([_entry(0, "debianized"), _entry(1, None)])
    search.relabel({1: "Debian"})
    assert search.filter("debian") == [1, 0]


@pytest.mark.slow
def test_debian_on_the_demo_finds_the_debian_latent_first():
    """As a new user typed it: 'Debian' put feature 48 ("build", "creates") first and 524 (labelled
    "Debian") twelfth, so enter chose the wrong one."""
    code, out, err = run_cli("features", "--demo", "--json")
    assert code == 0, err
    entries = [FeatureEntry.from_json(json.loads(line)) for line in out.splitlines()]
    code, out, _ = run_cli("features", "--demo", "--search", "Debian", "--limit", "1")
    assert code == 0 and out.split()[0] == "524"
    ui_search = FuzzyFeatureSearch(entries)
    assert entries[ui_search.filter("Debian")[0]].index == 524

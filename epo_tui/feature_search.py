"""The feature search: which latents of a catalog a query names, best first. One search for the CLI
(`epo-tui features --search`) and the UI's feature list; the UI only ranks the matches its own way.

Queries: `#N` gives latent N, then the indices starting with N; a bare number gives the same, then the
latents whose text contains it; words must each match the label or the top tokens.
"""

from __future__ import annotations

import re
from dataclasses import replace

from epo_tui.features import FeatureEntry
from epo_tui.text import inert

INDEX_QUERY = re.compile(r"#\s*([0-9]+)|([0-9]+)")
SHOWN_TOKENS = 8  # top tokens per row: enough to recognise a latent, short enough to fit
FUZZY_BELOW = 100  # letters-in-order matches are added only when exact substring matches are this rare


def _find(haystack: str, word: str) -> int:
    """Where `word` first occurs in `haystack`; past the end when only its letters-in-order match."""
    at = haystack.find(word)
    return at if at >= 0 else len(haystack)


def top_tokens_text(tokens: tuple[str, ...]) -> str:
    """Top tokens as one inert line; a token that is only whitespace shows as ␣."""
    return " · ".join(_inert(t).strip() or "␣" for t in tokens[:SHOWN_TOKENS])


def _inert(text: str) -> str:
    """`text.inert`, skipped for the usual printable text (building a 24k catalog's strings stays fast)."""
    return text if text.isprintable() else inert(text)


class FeatureSearch:
    """A catalog's searchable text, built once, and the latents a query matches, best first.

    Each latent is matched on "<label>  <top tokens>" (lowercased once here): every word of the query
    must be in it as a substring, or, when substrings are rare, as its letters in order within one word
    (a typo rescue). The matches are ranked by relevance (`tier`: the query is the label, then one of
    the top tokens, then whole words, then a word start, then anything else); within a tier, here by
    where the match starts (the label before the tokens), then index; the UI's list by textual's fuzzy
    scorer (`FuzzyFeatureSearch`).
    """

    SEPARATOR = "  "

    def __init__(self, entries: list[FeatureEntry]):
        self.entries = list(entries)
        self.position = {e.index: i for i, e in enumerate(self.entries)}
        self.index_texts = [str(e.index) for e in self.entries]
        self.labels: list[str] = []
        self.tokens: list[str] = []
        self.haystacks: list[str] = []
        self.label_leads: list[str] = []  # the label before any " — " example, lowercased, quotes stripped
        for entry in self.entries:
            self._add_text(entry)

    def _add_text(self, entry: FeatureEntry, at: int | None = None) -> None:
        label, tokens = _inert(entry.label or ""), top_tokens_text(entry.top_tokens)
        lead = label.split(" — ", 1)[0].strip().strip("\"'").strip().lower()
        values = (label, tokens, f"{label}{self.SEPARATOR}{tokens}".lower(), lead)
        columns = (self.labels, self.tokens, self.haystacks, self.label_leads)
        if at is None:
            for column, value in zip(columns, values):
                column.append(value)
        else:
            for column, value in zip(columns, values):
                column[at] = value

    def relabel(self, labels: dict[int, str]) -> int:
        """Sets the labels of the latents in `labels` (by index); returns how many were in the catalog."""
        applied = 0
        for index, label in labels.items():
            at = self.position.get(index)
            if at is not None:
                self.entries[at] = replace(self.entries[at], label=label)
                self._add_text(self.entries[at], at)
                applied += 1
        return applied

    def filter(self, query: str) -> list[int]:
        """Positions (into `entries`) of the latents matching `query`, best first.

        `#N` gives latent N, then the indices starting with N; a bare number gives the same, then the
        latents whose text contains it; words must each match (fuzzily) the label or top tokens.
        """
        query = query.strip()
        if not query:
            return list(range(len(self.entries)))
        number = INDEX_QUERY.fullmatch(query)
        if number:
            digits = number[1] or number[2]
            by_index = self._by_index(digits)
            if number[1] is not None:
                return by_index
            seen = set(by_index)
            return by_index + [p for p in self._by_text([digits]) if p not in seen]
        return self._by_text(query.lower().split())

    def _by_index(self, digits: str) -> list[int]:
        exact = self.position.get(int(digits))
        prefixed = [p for p, text in enumerate(self.index_texts) if text.startswith(digits) and p != exact]
        prefixed.sort(key=lambda p: self.entries[p].index)
        return ([exact] if exact is not None else []) + prefixed

    def _by_text(self, words: list[str]) -> list[int]:
        survivors: list[int] | range = range(len(self.entries))
        for word in words:  # each word narrows the previous word's survivors
            survivors = self._survivors(word, survivors)
            if not survivors:
                return []
        return self.rank(words, list(survivors))

    def rank(self, words: list[str], survivors: list[int]) -> list[int]:
        """The matching positions, best first: by `tier`, then where the first word's match starts (in
        the label before the tokens), then index."""
        tier = self.tier_of(words)
        first = words[0]
        return sorted(survivors, key=lambda p: (tier(p), _find(self.haystacks[p], first), self.entries[p].index))

    def tier_of(self, words: list[str]):
        """tier(position) for this query, lower is more relevant: 0 the query is the label (its lead, before
        any " — " example, quotes aside), 1 it is one of the top tokens, 2 every word is a whole word of
        the label or tokens, 3 the first word starts a word, 4 otherwise (inside words, letters in order)."""
        query = " ".join(words)
        whole = [re.compile(r"\b" + re.escape(word) + r"\b") for word in words]
        starts = re.compile(r"\b" + re.escape(words[0]))

        def tier(p: int) -> int:
            if self.label_leads[p] == query:
                return 0
            if any(token.strip().lower() == query for token in self.entries[p].top_tokens[:SHOWN_TOKENS]):
                return 1
            haystack = self.haystacks[p]
            if all(pattern.search(haystack) for pattern in whole):
                return 2
            return 3 if starts.search(haystack) else 4
        return tier

    def _survivors(self, word: str, positions) -> list[int]:
        """Positions whose text contains `word`; when those are few, also those with its letters in order
        inside one word ("nron" finds "neuron"): the typo rescue, kept to one word so it stays specific."""
        haystacks = self.haystacks
        hits = [p for p in positions if word in haystacks[p]]
        if len(hits) < FUZZY_BELOW and len(word) > 1:
            in_one_word = re.compile("[^ ]*?".join(map(re.escape, word)))
            hits += [p for p in positions if word not in haystacks[p] and in_one_word.search(haystacks[p])]
        return hits


def search_features(entries: list[FeatureEntry], query: str) -> list[FeatureEntry]:
    """The entries `query` matches, best first (FeatureSearch); all of them for an empty query."""
    search = FeatureSearch(entries)
    return [search.entries[p] for p in search.filter(query)]

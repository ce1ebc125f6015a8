"""The feature picker: a search box over the SAE's latents, with stars, notes, random picks and marks.

A catalog has tens of thousands of latents (24,576 for a 16k×1.5 SAE), so two things keep it instant:
the searchable text of every latent is built once (`FuzzyFeatureSearch`), and the list draws only the rows
on screen (`FeatureList`, a line-API scroll view) instead of building a widget per row.

Keys in the list: enter chooses, `*` stars, `n` edits the note, `r` jumps to a random (alive) latent,
`g` asks for an index, space marks up to two latents and `+` asks to combine them (`c` is the app's
copy), `ctrl+o` changes the order (the search's relevance, index, density, dataset maximum). In the search
box, `#N` (or a bare number) puts latent N first and enter jumps to it. Where the SAE has dataset
statistics, each row shows the latent's dataset maximum and density.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.style import Style
from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.fuzzy import Matcher
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Input, Static

from epo_tui.errors import UserError
from epo_tui.feature_search import INDEX_QUERY, FeatureSearch
from epo_tui.features import FeatureEntry
from epo_tui.labels import read_explanations
from epo_tui.stars import Stars
from epo_tui.text import inert
from epo_tui.tui.screens.note import NoteEditor
from epo_tui.tui.tokens import format_number

if TYPE_CHECKING:
    from epo_tui.dataset_stats import DatasetStats

STAR, MARK = "★", "●"
MAX_MARKED = 2
MATCHER_LIMIT = 2000  # matches ranked by textual's fuzzy Matcher (~7 µs each); more are ranked cheaply
# the list's orders, in the order ctrl+o cycles through them: the search's relevance (index order when
# nothing is typed), then by index, then most often firing first, then strongest on the dataset first
ORDERS = ("relevance", "index", "density", "dataset max")


class FuzzyFeatureSearch(FeatureSearch):
    """The feature search, its matches ranked within each relevance tier by textual's fuzzy `Matcher`
    (and the matched characters found for highlighting). Scoring every latent takes ~0.5 s for 24k
    latents, so only the search's matches are scored, and beyond MATCHER_LIMIT of them the plain ranking
    stays."""

    def rank(self, words: list[str], survivors: list[int]) -> list[int]:
        if len(survivors) > MATCHER_LIMIT:  # too many to score in time
            return super().rank(words, survivors)
        tier = self.tier_of(words)
        fuzzy = [Matcher(word).fuzzy_search for word in words]
        scores = {p: sum(f.match(w, self.haystacks[p])[0] for f, w in zip(fuzzy, words)) for p in survivors}
        return sorted(survivors, key=lambda p: (tier(p), -scores[p], self.entries[p].index))

    def match_offsets(self, query: str, position: int) -> tuple[set[int], set[int]]:
        """Which characters of the label and of the token text the query's words matched (to highlight)."""
        query = query.strip()
        if not query or INDEX_QUERY.fullmatch(query):
            return set(), set()
        haystack, label_length = self.haystacks[position], len(self.labels[position])
        label_hits, token_hits = set(), set()
        for word in query.lower().split():
            for offset in Matcher(word).fuzzy_search.match(word, haystack)[1]:
                if offset < label_length:
                    label_hits.add(offset)
                elif offset >= label_length + len(self.SEPARATOR):
                    token_hits.add(offset - label_length - len(self.SEPARATOR))
        return label_hits, token_hits


class FeatureList(ScrollView, can_focus=True):
    """The rows of the feature pane, drawn line by line: only the rows on screen cost anything."""

    COMPONENT_CLASSES = {"feature-list--cursor", "feature-list--match", "feature-list--star",
                         "feature-list--mark", "feature-list--index", "feature-list--tokens"}
    DEFAULT_CSS = """
    FeatureList { height: 1fr; }
    FeatureList > .feature-list--cursor { background: $boost; text-style: bold; }
    FeatureList:focus > .feature-list--cursor { background: $accent 40%; }
    FeatureList > .feature-list--match { text-style: bold underline; color: $warning; }
    FeatureList > .feature-list--star { color: $warning; }
    FeatureList > .feature-list--mark { color: $success; }
    FeatureList > .feature-list--index { color: $text-muted; }
    FeatureList > .feature-list--tokens { color: $text-muted; }
    """
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False, id="features.up"),
        Binding("down", "cursor(1)", "Down", show=False, id="features.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="features.page_up"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="features.page_down"),
        Binding("home", "cursor_to(0)", "First", show=False, id="features.first"),
        Binding("end", "cursor_to(-1)", "Last", show=False, id="features.last"),
    ]

    cursor = reactive(0, always_update=True)

    def __init__(self, pane: FeaturePane, **kwargs):
        super().__init__(**kwargs)
        self.pane = pane
        self.row_count = 0

    def set_row_count(self, count: int, cursor: int = 0) -> None:
        self.row_count = count
        self.virtual_size = Size(0, count)  # rows are cut to the width: no sideways scrolling
        self.cursor = cursor
        self.refresh()

    def watch_cursor(self, old: int, new: int) -> None:
        clamped = max(0, min(new, self.row_count - 1))
        if clamped != new:
            self.cursor = clamped
            return
        self.scroll_to_region(Region(0, new, 1, 1), animate=False, immediate=True)
        self.refresh()

    def action_cursor(self, step: int) -> None:
        self.cursor += step

    def action_page(self, direction: int) -> None:
        self.cursor += direction * max(1, self.scrollable_content_region.height - 1)

    def action_cursor_to(self, row: int) -> None:
        self.cursor = row if row >= 0 else self.row_count - 1

    def on_click(self, event: events.Click) -> None:
        row = event.y + self.scroll_offset.y
        if 0 <= row < self.row_count:
            self.cursor = row

    def render_line(self, y: int) -> Strip:
        row = self.scroll_offset.y + y
        width = self.scrollable_content_region.width
        if row >= self.row_count:
            return Strip.blank(width, self.rich_style)
        text = self.pane.row_text(row, width, self.get_component_rich_style)
        text.truncate(width, overflow="ellipsis", pad=True)
        if row == self.cursor:  # after padding, so the bar spans the whole width
            text.stylize(self.get_component_rich_style("feature-list--cursor"))
        return Strip(text.render(self.app.console), width).apply_style(self.rich_style)


class FeaturePane(Vertical):
    """A search box over a list of latents; tells the app which latent was chosen or which two to combine."""

    DEFAULT_CSS = """
    FeaturePane { height: 1fr; }
    FeaturePane > #feature-search { margin: 0; }
    FeaturePane > #feature-count { height: 1; color: $text-muted; padding: 0 1; }
    """
    BINDINGS = [
        Binding("enter", "choose", "Choose", id="features.choose"),
        # shown in the README and the command palette; the footer keeps its room for the app's keys
        Binding("asterisk", "toggle_star", "Star", show=False, id="features.star"),
        Binding("n", "edit_note", "Note", show=False, id="features.note"),
        Binding("r", "random", "Random", show=False, id="features.random"),
        Binding("g", "go_to", "Go to #", show=False, id="features.go_to"),
        Binding("space", "mark", "Mark", show=False, id="features.mark"),
        Binding("plus", "combine", "Combine 2", show=False, id="features.combine"),
        Binding("ctrl+o", "next_order", "Order: relevance, index, density, max", show=False,
                id="features.order"),
    ]

    class Chosen(Message):
        """The user chose a latent to search for."""

        def __init__(self, entry: FeatureEntry):
            super().__init__()
            self.entry = entry

    class Combine(Message):
        """The user asked to search for two marked latents together."""

        def __init__(self, entries: list[FeatureEntry]):
            super().__init__()
            self.entries = entries

    def __init__(self, *, alive: set[int] | None = None, rng: random.Random | None = None, **kwargs):
        super().__init__(**kwargs)
        self.search = FuzzyFeatureSearch([])
        self.stars: Stars | None = None
        self.alive = alive  # latents that fire at all (None: unknown, every latent counts)
        self.rng = rng or random.Random()
        self.rows: list[int] = []  # positions into search.entries, in display order
        self.query_text = ""  # the query the rows were built for
        self.marked: list[int] = []  # latent indices, oldest first
        self.order = ORDERS[0]
        self.dataset: DatasetStats | None = None  # the SAE's dataset statistics, where there are some

    def compose(self) -> ComposeResult:
        yield Input(placeholder="search features: words, tokens or #index", id="feature-search")
        yield FeatureList(self, id="feature-list")
        yield Static("", id="feature-count")

    # -- feeding the pane

    @property
    def entries(self) -> list[FeatureEntry]:
        return self.search.entries

    def set_features(self, entries: list[FeatureEntry], stars: Stars | None = None) -> None:
        """Shows a new catalog (the stars belong to its SAE); a damaged stars file is reported."""
        self.search = FuzzyFeatureSearch(entries)
        self.stars = stars
        self.marked = []
        self._apply_query(self.query_text)
        if stars is not None and stars.problem:
            self.notify(inert(stars.problem), title="stars", severity="warning", timeout=10, markup=False)

    def set_alive(self, indices: set[int] | None) -> None:
        """The latents that fire (dead ones show struck through; `r` skips them); None: unknown."""
        self.alive = indices
        if self.entries:
            self._show_count()
            self.query_one(FeatureList).refresh()

    def set_dataset(self, stats: DatasetStats | None) -> None:
        """The SAE's dataset statistics: each row then shows its latent's maximum and density."""
        self.dataset = stats
        self._apply_query(self.query_text, keep=self.highlighted)

    def density_of(self, entry: FeatureEntry) -> float | None:
        """The fraction of tokens the latent fires on: the dataset's where known, else the SAE's own record."""
        density = self.dataset.density(entry.index) if self.dataset is not None else None
        if density is None and entry.log10_density is not None:
            density = 10.0 ** entry.log10_density
        return density

    def dataset_max_of(self, entry: FeatureEntry) -> float | None:
        return self.dataset.max(entry.index) if self.dataset is not None else None

    def action_next_order(self) -> None:
        self.order = ORDERS[(ORDERS.index(self.order) + 1) % len(ORDERS)]
        self._apply_query(self.query_text, keep=self.highlighted)
        self.notify(f"features by {self.order}", timeout=2)

    def import_labels(self, path: Path) -> int:
        """Labels from a Neuronpedia explanations export; returns how many latents got one (UserError if unreadable)."""
        return self.apply_labels(read_explanations(Path(path)))

    def apply_labels(self, labels: dict[int, str]) -> int:
        """Sets these labels ({latent index: text}); returns how many latents of the catalog got one."""
        applied = self.search.relabel(labels)
        self._apply_query(self.query_text, keep=self.highlighted)
        return applied

    def focus_search(self) -> None:
        self.query_one("#feature-search", Input).focus()

    # -- what is shown

    @property
    def highlighted(self) -> FeatureEntry | None:
        row = self.query_one(FeatureList).cursor
        return self.entries[self.rows[row]] if 0 <= row < len(self.rows) else None

    @property
    def shown(self) -> list[FeatureEntry]:
        """The latents the list shows, in order (all of them, not only those on screen)."""
        return [self.entries[p] for p in self.rows]

    def row_text(self, row: int, width: int, style_of: Callable[[str], Style]) -> Text:
        """One row: mark, index, star, label (matches highlighted) and top tokens."""
        position = self.rows[row]
        entry = self.entries[position]
        label_hits, token_hits = self.search.match_offsets(self.query_text, position)
        match = style_of("feature-list--match")
        label = Text(self.search.labels[position] or "(no label)",
                     style="italic" if not self.search.labels[position] else "")
        for offset in label_hits:
            label.stylize(match, offset, offset + 1)
        tokens = Text(self.search.tokens[position], style=style_of("feature-list--tokens"))
        for offset in token_hits:
            tokens.stylize(match, offset, offset + 1)
        figures = self._dataset_cells(entry)
        label_width = max(10, (width - 10 - len(figures)) * 3 // 5)
        label.truncate(label_width, overflow="ellipsis", pad=True)
        starred = self.stars is not None and self.stars.is_starred(entry.index)
        noted = self.stars is not None and bool(self.stars.note(entry.index))
        index_style = style_of("feature-list--index")
        if self.alive is not None and entry.index not in self.alive:  # dead: the index struck through
            index = Text.assemble((f"{entry.index:>6}", index_style + Style(strike=True)), (" ", index_style))
        else:
            index = Text(f"{entry.index:>6} ", style=index_style)
        return Text.assemble(
            (MARK if entry.index in self.marked else " ", style_of("feature-list--mark")),
            index,
            (STAR if starred else ("✎" if noted else " "), style_of("feature-list--star")),
            (figures, index_style), " ", label, " ", tokens, no_wrap=True, end="")

    def _dataset_cells(self, entry: FeatureEntry) -> str:
        """' 2.21 0.81%': the latent's dataset maximum and density, where the SAE has dataset statistics."""
        if self.dataset is None:
            return ""
        top, density = self.dataset_max_of(entry), self.dataset.density(entry.index)
        shown_density = "" if density is None else f"{density * 100:.2g}%"
        return f" {format_number(top) if top is not None else '':>5} {shown_density:>6}"

    def _apply_query(self, query: str, keep: FeatureEntry | None = None) -> None:
        """Rebuilds the rows for `query`; the cursor stays on `keep` when it is still shown, else goes to the top."""
        self.query_text = query
        self.rows = self._ordered(self.search.filter(query))
        cursor = 0
        if keep is not None:
            position = self.search.position.get(keep.index)
            cursor = next((r for r, p in enumerate(self.rows) if p == position), 0)
        self.query_one(FeatureList).set_row_count(len(self.rows), cursor)
        self._show_count()

    def _ordered(self, rows: list[int]) -> list[int]:
        """The search's rows in the chosen order; latents without a value (no density known) go last."""
        if self.order == "relevance":
            return rows
        if self.order == "index":
            return sorted(rows, key=lambda p: self.entries[p].index)
        value_of = self.density_of if self.order == "density" else self.dataset_max_of

        def key(position: int) -> tuple[float, int]:
            value = value_of(self.entries[position])
            return (-value if value is not None and math.isfinite(value) else math.inf, self.entries[position].index)

        return sorted(rows, key=key)

    def _show_count(self) -> None:
        parts = [f"{len(self.rows):,} of {len(self.entries):,} features"]
        if self.order != ORDERS[0]:
            parts.append(f"by {self.order}")
        if self.alive is not None:
            parts.append(f"{len(self.alive):,} alive")
        if self.stars is not None and self.stars.starred():
            parts.append(f"{STAR} {len(self.stars.starred())}")
        if self.marked:
            parts.append("marked " + " + ".join(f"#{i}" for i in self.marked)
                         + (": + combines" if len(self.marked) == MAX_MARKED else ""))
        self.query_one("#feature-count", Static).update(Text(" · ".join(parts)))

    def jump_to(self, index: int, clear_search: bool = False) -> bool:
        """Moves the cursor to latent `index`, clearing the search when asked or when it hides the latent;
        False when the catalog has no such latent."""
        position = self.search.position.get(index)
        if position is None:
            return False
        if clear_search or position not in self.rows:
            search_box = self.query_one("#feature-search", Input)
            self._apply_query("")
            search_box.value = ""  # its Changed event then matches query_text and is ignored
        feature_list = self.query_one(FeatureList)
        feature_list.cursor = self.rows.index(position)
        feature_list.focus()
        return True

    def choose(self, index: int) -> bool:
        """Moves to latent `index` and chooses it (as enter does); False when the catalog lacks it."""
        if not self.jump_to(index):
            return False
        self.action_choose()
        return True

    # -- the search box

    @on(Input.Changed, "#feature-search")
    def _query_changed(self, event: Input.Changed) -> None:
        event.stop()
        if event.value != self.query_text:
            self._apply_query(event.value)

    @on(Input.Submitted, "#feature-search")
    def _query_submitted(self, event: Input.Submitted) -> None:
        """`#N` or a number jumps to latent N; any other query moves to the list to pick from it."""
        event.stop()
        number = INDEX_QUERY.fullmatch(event.value.strip())
        if number:
            index = int(number[1] or number[2])
            if self.jump_to(index, clear_search=True):  # the full list: its neighbours are browsable
                return
            self.notify(f"there is no feature #{index}", severity="warning", markup=False)
        self.query_one(FeatureList).focus()

    def key_down(self, event: events.Key) -> None:
        """Down in the search box goes to the list."""
        if isinstance(self.app.focused, Input):
            event.stop()
            self.query_one(FeatureList).focus()

    # -- actions on the highlighted latent

    def action_choose(self) -> None:
        entry = self.highlighted
        if entry is not None:
            self.post_message(self.Chosen(entry))

    def action_toggle_star(self) -> None:
        entry = self.highlighted
        if entry is None or not self._can_mark():
            return
        try:
            self.stars.toggle_star(entry.index)
        except UserError as err:
            self.notify(inert(str(err)), title="star not saved", severity="error", markup=False)
        self._redraw()

    def action_edit_note(self) -> None:
        entry = self.highlighted
        if entry is None or not self._can_mark():
            return

        def save(note: str | None) -> None:
            if note is None:
                return
            try:
                self.stars.set_note(entry.index, note)
            except UserError as err:
                self.notify(inert(str(err)), title="note not saved", severity="error", markup=False)
            self._redraw()

        title = f"note for feature {entry.index}" + (f": {inert(entry.label)}" if entry.label else "")
        self.app.push_screen(NoteEditor(title, self.stars.note(entry.index)), save)

    def action_random(self) -> None:
        """Jumps to a random latent among the alive ones (any latent when liveness is unknown)."""
        candidates = sorted(self.search.position if self.alive is None else
                            (i for i in self.alive if i in self.search.position))
        if not candidates:
            self.notify("no feature to pick from", severity="warning", markup=False)
            return
        self.jump_to(self.rng.choice(candidates))

    def action_go_to(self) -> None:
        """Puts `#` in the search box: type the index and press enter."""
        search_box = self.query_one("#feature-search", Input)
        search_box.value = "#"
        search_box.cursor_position = 1
        search_box.focus()

    def action_mark(self) -> None:
        """Marks or unmarks the highlighted latent; a third mark drops the oldest."""
        entry = self.highlighted
        if entry is None:
            return
        if entry.index in self.marked:
            self.marked.remove(entry.index)
        else:
            self.marked = (self.marked + [entry.index])[-MAX_MARKED:]
        self._redraw()

    def action_combine(self) -> None:
        if len(self.marked) != MAX_MARKED:
            self.notify("mark two features with space, then press +", severity="warning", markup=False)
            return
        self.post_message(self.Combine([self.entries[self.search.position[i]] for i in self.marked]))

    def _can_mark(self) -> bool:
        if self.stars is None:
            self.notify("stars are not available before the SAE is loaded", severity="warning", markup=False)
        return self.stars is not None

    def _redraw(self) -> None:
        self.query_one(FeatureList).refresh()
        self._show_count()

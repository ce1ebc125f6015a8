"""The chosen latent's dataset examples: its maximum and density over its strongest examples, each a
window of tokens around its strongest token, coloured on the scale the elites use, so a dream and a
dataset example compare at a glance. Hidden for a latent without dataset statistics."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from epo_tui.dataset_stats import DatasetStats, Example
from epo_tui.themes import Theme
from epo_tui.tui.tokens import activation_text, format_number

SHOWN_EXAMPLES = 6
TOKENS_BEFORE_MAX = 12  # the window's tokens before the strongest one (its context), and after it
TOKENS_AFTER_MAX = 4


def example_window(example: Example) -> tuple[list[str], list[float]]:
    """The example's tokens and values around its strongest token (TOKENS_BEFORE_MAX before, ...)."""
    start = max(0, example.max_position - TOKENS_BEFORE_MAX)
    stop = example.max_position + TOKENS_AFTER_MAX + 1
    return list(example.tokens[start:stop]), list(example.values[start:stop])


def density_text(density: float | None) -> str:
    """'fires on 0.81% of tokens', or '' when unknown."""
    if density is None:
        return ""
    return f"fires on {density * 100:.3g}% of tokens"


class DatasetPane(Vertical):
    """A header line (the latent's dataset maximum, density, where the statistics came from) over its
    strongest examples, one line each: the example's maximum, then its tokens around that maximum."""

    DEFAULT_CSS = f"""
    DatasetPane {{ height: {SHOWN_EXAMPLES + 1}; padding: 0 1; }}
    DatasetPane > #dataset-examples {{ height: 1fr; }}
    """

    def __init__(self, theme: Theme, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.epo_theme = theme
        self.stats: DatasetStats | None = None
        self.index: int | None = None
        self.examples: list[Example] = []
        self.scale_max = 0.0
        self.display = False

    def compose(self) -> ComposeResult:
        yield Static("", id="dataset-examples")

    @property
    def dataset_max(self) -> float | None:
        """The shown latent's dataset maximum (None: no statistics for it)."""
        return None if self.stats is None or self.index is None else self.stats.max(self.index)

    def show_latent(self, stats: DatasetStats | None, index: int | None) -> None:
        """Shows latent `index` of `stats` (reads its examples); hides the pane where there is nothing."""
        self.stats, self.index = stats, index
        known = stats is not None and index is not None and 0 <= index < stats.d_sae
        self.examples = stats.examples(index)[:SHOWN_EXAMPLES] if known and stats.has_examples(index) else []
        self.display = known and (self.dataset_max is not None or bool(self.examples))
        self._render_examples()

    def set_scale(self, scale_max: float) -> None:
        """The activation the strongest colour stands for: the one the elites pane uses."""
        if scale_max != self.scale_max:
            self.scale_max = scale_max
            self._render_examples()

    def _render_examples(self) -> None:
        if self.display and self.is_mounted:
            self.query_one("#dataset-examples", Static).update(Group(*self.lines()))

    def lines(self) -> list[Text]:
        """What the pane shows: the header line (latent, dataset maximum, density, origin), then one
        line per example."""
        stats, index = self.stats, self.index
        if stats is None or index is None:
            return []
        parts = [f"dataset max {format_number(self.dataset_max)}" if self.dataset_max is not None else "",
                 density_text(stats.density(index)), stats.provenance.get("origin", "")]
        header = Text(f"latent {index}: " + " · ".join(p for p in parts if p), style="bold", no_wrap=True,
                      overflow="ellipsis")
        return [header, *([self._example_line(e) for e in self.examples] or [Text("no examples")])]

    def _example_line(self, example: Example) -> Text:
        tokens, values = example_window(example)
        line = Text(f"{format_number(example.max_value):>6} ", no_wrap=True, overflow="ellipsis")
        line.append_text(activation_text(tokens, values, 0, self.epo_theme, self.scale_max or None))
        return line

    def on_mount(self) -> None:
        self._render_examples()

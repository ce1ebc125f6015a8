"""The live elites: one row per elite (λ, act, xent, the coloured prompt), refreshed per progress event.

Rows are updated cell by cell rather than rebuilt, so the cursor (the researcher's selection) stays
put and no highlight message fires while a search streams in; all rows share one colour scale (the
strongest activation over all elites, or the latent's dataset maximum where that is larger), so colours
compare across rows and with the dataset examples, and the legend says what the strongest colour stands
for.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from epo_tui.protocol import Elite
from epo_tui.themes import Theme
from epo_tui.tui.tokens import activation_text, format_number, legend, scale_max_of

EMPTY_TEXT = "no search yet"
COLUMNS = (("λ", "penalty"), ("act", "act"), ("xent", "xent"), ("prompt", "prompt"))  # (label, key)


def elites_scale_max(elites: list[Elite]) -> float:
    """The strongest activation on any elite's prompt tokens: the top of the shared colour scale."""
    return max((scale_max_of(e.activations[e.prompt_start:]) for e in elites), default=0.0)


class ElitesPane(Vertical):
    """A legend line over a `DataTable` of the current elites, with a row cursor for selection."""

    DEFAULT_CSS = """
    ElitesPane { height: 1fr; }
    ElitesPane > #elites-legend { height: 1; padding: 0 1; }
    ElitesPane > DataTable { height: 1fr; }
    """

    class Selected(Message):
        """The cursor moved to elite `index` (also sent when the first elites appear)."""

        def __init__(self, index: int, elite: Elite) -> None:
            super().__init__()
            self.index, self.elite = index, elite

    def __init__(self, theme: Theme, *, name: str | None = None, id: str | None = None,  # noqa: A002
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.epo_theme = theme
        self.elites: list[Elite] = []
        self.scale_max = 0.0
        self.scale_floor = 0.0  # the scale reaches at least this (the latent's dataset maximum)
        self.penalty_scale = ""  # what λ means in the search shown (a `started` event's penalty_scale)
        self._mounted = False  # the table exists from on_mount on; elites given earlier are shown then

    def compose(self) -> ComposeResult:
        yield Static(EMPTY_TEXT, id="elites-legend")
        table: DataTable = DataTable(cursor_type="row", zebra_stripes=False, id="elites-table")
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        table.display = False  # until there are elites: the legend line says "no search yet"
        yield table

    def on_mount(self) -> None:
        self._mounted = True
        self._show()

    @property
    def table(self) -> DataTable:
        return self.query_one("#elites-table", DataTable)

    @property
    def selected_index(self) -> int | None:
        return self.table.cursor_row if self.elites else None

    @property
    def selected_elite(self) -> Elite | None:
        index = self.selected_index
        return self.elites[index] if index is not None and index < len(self.elites) else None

    def _cells(self, elite: Elite) -> dict[str, Text]:
        return {
            "penalty": Text(format_number(elite.penalty), justify="right"),
            "act": Text(format_number(elite.act), justify="right"),
            "xent": Text(format_number(elite.xent), justify="right"),
            "prompt": activation_text(elite.tokens, elite.activations, elite.prompt_start, self.epo_theme,
                                      self.scale_max, elite.token_bytes),
        }

    def update_elites(self, elites: list[Elite]) -> None:
        """Shows `elites` (a `started`/`progress` event's list), keeping the cursor on its row.

        Same number of elites as shown: cells are replaced in place (no cursor movement, no message).
        Another number (a new search): the rows are rebuilt and the cursor clamped.
        """
        self.elites = list(elites)
        self.scale_max = max(elites_scale_max(self.elites), self.scale_floor)
        if self._mounted:
            self._show()

    def set_scale_floor(self, floor: float) -> None:
        """Makes the colour scale reach at least `floor` (activation units): the dataset examples shown
        beside the elites use the same scale, so their colours compare."""
        if floor != self.scale_floor:
            self.scale_floor = floor
            self.update_elites(self.elites)

    def _show(self) -> None:
        """Puts `self.elites` on screen (the legend, the rows), in place when the row count holds."""
        table = self.table
        legend_line = self.query_one("#elites-legend", Static)
        if not self.elites:
            table.clear()
            table.display = False
            legend_line.update(EMPTY_TEXT)
            return
        legend_line.update(Text.assemble("activation ", legend(self.epo_theme, self.scale_max)))
        table.display = True
        rows = [self._cells(e) for e in self.elites]
        if table.row_count == len(rows):
            for i, cells in enumerate(rows):
                for key, value in cells.items():
                    table.update_cell(str(i), key, value, update_width=key == "prompt")
            return
        cursor = table.cursor_row
        table.clear()
        for i, cells in enumerate(rows):
            table.add_row(*(cells[key] for _, key in COLUMNS), key=str(i))
        table.move_cursor(row=min(cursor, len(rows) - 1))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if 0 <= event.cursor_row < len(self.elites):
            self.post_message(self.Selected(event.cursor_row, self.elites[event.cursor_row]))

    def details(self, index: int | None = None) -> RenderableType:
        """Elite `index` (default: the selected one) token by token, for an on-demand panel.

        A header line (λ, act, xent, objective), what λ means in this search when the worker said, then a
        table of pos | token | act, pos counting from the prompt's first token. The model's xent is per
        prompt only, so it is not broken down here.
        """
        if index is None:
            index = self.selected_index
        if index is None or not 0 <= index < len(self.elites):
            return Text(EMPTY_TEXT)
        elite = self.elites[index]
        start = elite.prompt_start
        header = Text.assemble(
            (f"elite {index}", "bold"),
            f"  λ {format_number(elite.penalty)}  act {format_number(elite.act)}"
            f"  xent {format_number(elite.xent)}  objective {format_number(elite.objective)}",
        )
        table = Table(box=None, pad_edge=False, show_edge=False)
        table.add_column("pos", justify="right")
        table.add_column("token")
        table.add_column("act", justify="right")
        raw = elite.token_bytes[start:] if len(elite.token_bytes) == len(elite.tokens) else None
        for pos, (token, act) in enumerate(zip(elite.tokens[start:], elite.activations[start:])):
            table.add_row(str(pos), activation_text([token], [act], 0, self.epo_theme, self.scale_max,
                                                    None if raw is None else [raw[pos]]),
                          format_number(act))
        meaning = [Text(self.penalty_scale, style="dim")] if self.penalty_scale else []
        return Group(header, *meaning, table)

"""The help screen (`?`, `F1`): every key of every screen, read from the bindings themselves, so it
lists what the keys really do."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

# (where, its bindings): the app passes the screens and panes it has
HelpSections = list[tuple[str, list[Binding]]]


class HelpScreen(ModalScreen[None]):
    """A table per screen of its keys and what each does; escape, q, ? or F1 close it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; height: 90%; border: round $primary; background: $surface;
                                  padding: 0 1; }
    """
    BINDINGS = [Binding("escape", "close", "Close", id="help.close"),
                Binding("q", "close", show=False, id="help.close"),
                Binding("question_mark", "close", show=False, id="help.close"),
                Binding("f1", "close", show=False, id="help.close")]

    def __init__(self, sections: HelpSections):
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Label("escape closes · ctrl+p searches every command · [keys] in config.toml rebinds a key "
                        "by its id", markup=False)
            yield Static(self.keys_table(), id="help-keys")

    def keys_table(self) -> Table:
        table = Table(box=None, show_header=False, padding=(0, 2, 0, 0))
        table.add_column("key", style="bold", no_wrap=True)
        table.add_column("action")
        table.add_column("id", style="dim")
        for number, (where, bindings) in enumerate(self.sections):
            if number:
                table.add_row("", "")
            table.add_row(Text(where, style="underline"), "", "")
            for binding in bindings:
                if binding.description:
                    table.add_row(self.app.get_key_display(binding), binding.description, binding.id or "")
        return table

    def action_close(self) -> None:
        self.dismiss(None)

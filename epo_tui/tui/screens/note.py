"""A latent's note (`n` in the feature list): one line, kept in stars.json by the feature pane."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class NoteEditor(ModalScreen[str | None]):
    """A one-line editor for a latent's note: enter saves (empty removes it), escape cancels."""

    DEFAULT_CSS = """
    NoteEditor { align: center middle; }
    NoteEditor > Vertical { width: 70%; height: auto; border: round $accent; padding: 0 1; background: $panel; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="note.cancel")]

    def __init__(self, title: str, note: str):
        super().__init__()
        self.title_text, self.note = title, note

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self.title_text))
            yield Input(self.note, placeholder="a note (enter saves, escape cancels)", id="note")

    @on(Input.Submitted)
    def save(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)

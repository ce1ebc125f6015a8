"""Modal screens: edit a prompt and inject it (`e`), the scratchpad (`t`), an elite token by token (`d`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from rich.console import RenderableType

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from epo_tui.client import WorkerError
from epo_tui.protocol import Scored
from epo_tui.scored import mean_xent, peak
from epo_tui.text import inert
from epo_tui.themes import Theme
from epo_tui.tui.tokens import activation_text, format_number

SCORE_DEBOUNCE_S = 0.25  # typing pauses this long before the text is scored


class PromptEditor(ModalScreen[str | None]):
    """One line of text to edit; enter returns it, escape returns None."""

    DEFAULT_CSS = """
    PromptEditor { align: center middle; }
    PromptEditor > Vertical { width: 90%; height: auto; border: round $primary; background: $surface; padding: 0 1; }
    """
    AUTO_FOCUS = "Input"  # the app's own AUTO_FOCUS names the feature list, which is not on this screen
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="editor.cancel")]

    def __init__(self, title: str, text: str):
        super().__init__()
        self.title_text, self.text = title, text

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text)
            yield Input(self.text, id="prompt-editor")

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Scratchpad(ModalScreen[int | None]):
    """Type a text, see each token's activation of the current feature as you type, and the latents
    that fire most on it; enter on one of those chooses it (the screen returns its index)."""

    DEFAULT_CSS = """
    Scratchpad { align: center middle; }
    Scratchpad > Vertical { width: 90%; height: auto; border: round $primary; background: $surface; padding: 0 1; }
    Scratchpad #scratch-result { height: auto; min-height: 3; }
    Scratchpad #scratch-top { height: auto; max-height: 10; }
    """
    AUTO_FOCUS = "Input"
    BINDINGS = [Binding("escape", "close", "Close", id="scratchpad.close")]

    def __init__(self, theme: Theme, feature: int, score: Callable[[str, int], Awaitable[Scored]],
                 label_of: Callable[[int], str | None] = lambda index: None):
        super().__init__()
        self.theme, self.feature, self.score, self.label_of = theme, feature, score, label_of
        self.last_scored: Scored | None = None  # the newest answer shown

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"scratchpad: feature {self.feature} (escape closes; down, then enter on a latent "
                        "below chooses it)")
            yield Input(placeholder="type a text", id="scratch-input")
            yield Static("", id="scratch-result")
            yield OptionList(id="scratch-top")

    @on(Input.Changed)
    def changed(self, event: Input.Changed) -> None:
        self.score_later(event.value)

    @work(exclusive=True, group="scratch")
    async def score_later(self, text: str) -> None:
        """Scores the text once typing pauses; a newer keystroke cancels this one (exclusive)."""
        import asyncio

        await asyncio.sleep(SCORE_DEBOUNCE_S)
        result = self.query_one("#scratch-result", Static)
        if not text:
            result.update("")
            return
        try:
            scored = await self.score(text, self.feature)
        except WorkerError as err:
            result.update(inert(err.message))
            return
        self.last_scored = scored
        best, (xent, _) = peak(scored), mean_xent(scored)
        line = activation_text(scored.tokens, scored.activations, scored.prompt_start, self.theme,
                               token_bytes=scored.token_bytes)
        line.append(f"\nmax act {best[1] if best else 0.0:.3f} · mean xent {xent:.3f}")
        if scored.top_features:
            line.append("\nfiring most on this text:")
        result.update(line)
        self.show_top_features(scored)

    def show_top_features(self, scored: Scored) -> None:
        """One option per latent firing most on the text: its act there, index, label and the token."""
        top = self.query_one("#scratch-top", OptionList)
        top.clear_options()
        for latent in scored.top_features:
            token = scored.tokens[latent.position] if 0 <= latent.position < len(scored.tokens) else ""
            label = self.label_of(latent.index) or "(no label)"
            top.add_option(Option(f"{format_number(latent.act):>6}  #{latent.index:<6} {inert(label)}  "
                                  f"on {inert(repr(token))}", id=str(latent.index)))

    def on_key(self, event) -> None:
        """Down in the text box moves to the latents below it."""
        top = self.query_one("#scratch-top", OptionList)
        if event.key == "down" and isinstance(self.focused, Input) and top.option_count:
            event.stop()
            top.focus()
            top.highlighted = 0

    @on(OptionList.OptionSelected, "#scratch-top")
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))

    def action_close(self) -> None:
        self.dismiss(None)


class EliteDetails(ModalScreen[None]):
    """The selected elite's per-token activations (a renderable made by the elites pane), scrollable."""

    DEFAULT_CSS = """
    EliteDetails { align: center middle; }
    EliteDetails > VerticalScroll { width: 90%; height: 90%; border: round $primary; background: $surface; padding: 0 1; }
    """
    AUTO_FOCUS = "VerticalScroll"
    BINDINGS = [Binding("escape", "close", "Close", id="details.close"),
                Binding("d", "close", show=False, id="details.close"),
                Binding("q", "close", show=False, id="details.close")]

    def __init__(self, details: RenderableType):
        super().__init__()
        self.details = details

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Label("elite details (escape closes)")
            yield Static(self.details, id="elite-details")

    def action_close(self) -> None:
        self.dismiss(None)

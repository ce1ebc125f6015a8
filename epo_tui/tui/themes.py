"""epo-tui theme files as Textual themes."""

from __future__ import annotations

from textual.theme import Theme as TextualTheme

from epo_tui.themes import Theme


def textual_theme(theme: Theme) -> TextualTheme:
    c = theme.colours
    return TextualTheme(name=theme.name, dark=theme.dark, primary=c["primary"], secondary=c["secondary"],
                        accent=c["accent"], foreground=c["foreground"], background=c["background"],
                        surface=c["surface"], panel=c["panel"], success=c["success"], warning=c["warning"],
                        error=c["error"])

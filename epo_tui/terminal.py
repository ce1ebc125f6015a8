"""Command results on the terminal: coloured when stdout is a terminal, plain text when piped."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from epo_tui.features import FeatureEntry
from epo_tui.text import inert
from epo_tui.themes import Theme, load_theme


def _console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def activation_text(tokens: list[str], activations: list[float], theme: Theme) -> Text:
    """The tokens run together, each on a background coloured by its activation (0 = no colour)."""
    top = max((a for a in activations if a > 0), default=0.0)
    text = Text()
    for token, act in zip(tokens, activations):
        style = f"{theme.activation_text} on {theme.activation_colour(act / top)}" if act > 0 and top else ""
        text.append(inert(token), style=style)
    return text


def print_score(scored: dict, feature: int) -> None:
    console = _console()
    tokens, acts, xents = scored["tokens"], scored["activations"], scored["xent"]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (("pos", "right"), ("token", "left"), ("id", "right"),
                          (f"act[{feature}]", "right"), ("xent", "right")):
        table.add_column(name, justify=justify)
    theme = load_theme()
    top = max(acts) if acts else 0.0
    for pos, (token, token_id, act, xent) in enumerate(zip(tokens, scored["token_ids"], acts, xents)):
        act_cell = Text(f"{act:.3f}")
        if act > 0 and top > 0:
            act_cell.stylize(f"{theme.activation_text} on {theme.activation_colour(act / top)}")
        table.add_row(str(pos), Text(f"'{inert(token)}'"), str(token_id), act_cell,  # Text: no markup
                      "-" if xent is None else f"{xent:.3f}")
    console.print(table)
    if console.is_terminal:
        console.print(activation_text(tokens, acts, theme))
    best = max(range(len(acts)), key=acts.__getitem__)
    scored_xents = [x for x in xents if x is not None]
    mean_xent = sum(scored_xents) / len(scored_xents) if scored_xents else float("nan")
    console.print(f"max act {acts[best]:.3f} at pos {best} ('{inert(tokens[best])}'); "
                  f"mean xent {mean_xent:.3f} over {len(scored_xents)} tokens", markup=False)


def print_features(entries: list[FeatureEntry]) -> None:
    console = _console()
    for entry in entries:
        tokens = "  ".join(repr(inert(t)) for t in entry.top_tokens)
        label = f"{inert(entry.label)}  " if entry.label else ""
        dead = "(dead)  " if entry.alive is False else ""  # dead by the SAE's own firing record
        console.print(f"{entry.index:>7}  {dead}{label}{tokens}", markup=False)

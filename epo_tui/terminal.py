"""Command results on the terminal: coloured when stdout is a terminal, plain text when piped."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from epo_tui.features import FeatureEntry
from epo_tui.scored import mean_xent, peak, prompt_start
from epo_tui.text import inert, token_display
from epo_tui.themes import load_theme
from epo_tui.tui.tokens import activation_style, activation_text


def _console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def token_cell(token: str, raw_hex: str | None = None) -> Text:
    """One token, inert; each `\\xNN` that stands for a raw byte (known from `raw_hex`) also dim."""
    text = Text()
    for piece, is_byte in token_display(token, raw_hex):
        text.append(piece, style="dim" if is_byte else "")
    return text


def print_score(scored: dict, feature: int) -> None:
    """The per-token table, the coloured text (on a terminal) and a summary line. Only the text's own
    tokens (from `prompt_start`) are coloured and count in the maximum, as in the UI."""
    console = _console()
    tokens, acts, xents = scored["tokens"], scored["activations"], scored["xent"]
    start = prompt_start(scored)
    token_bytes = scored.get("token_bytes")
    raw = list(token_bytes) if token_bytes is not None and len(token_bytes) == len(tokens) else [None] * len(tokens)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (("pos", "right"), ("token", "left"), ("id", "right"),
                          (f"act[{feature}]", "right"), ("xent", "right")):
        table.add_column(name, justify=justify)
    theme = load_theme()
    best = peak(scored)
    top = max(best[1], 0.0) if best else 0.0
    for pos, (token, raw_hex, token_id, act, xent) in enumerate(zip(tokens, raw, scored["token_ids"], acts, xents)):
        act_cell = Text(f"{act:.3f}")
        style = activation_style(act, theme, top) if pos >= start else None
        if style is not None:
            act_cell.stylize(style)
        table.add_row(str(pos), Text.assemble("'", token_cell(token, raw_hex), "'"), str(token_id), act_cell,
                      "-" if xent is None else f"{xent:.3f}")
    console.print(table)
    if console.is_terminal:
        console.print(activation_text(tokens, acts, start, theme, top, token_bytes=token_bytes))
    mean, count = mean_xent(scored)
    where = f"{best[1]:.3f} at pos {best[0]} ('{inert(tokens[best[0]])}')" if best else "- (no text token)"
    console.print(f"max act {where}; mean xent {mean:.3f} over {count} tokens", markup=False)


def print_features(entries: list[FeatureEntry]) -> None:
    console = _console()
    for entry in entries:
        tokens = "  ".join(f"'{inert(t)}'" for t in entry.top_tokens)  # as `score` quotes them: no doubled \\
        label = f"{inert(entry.label)}  " if entry.label else ""
        dead = "(dead)  " if entry.alive is False else ""  # dead by the SAE's own firing record
        console.print(f"{entry.index:>7}  {dead}{label}{tokens}", markup=False)

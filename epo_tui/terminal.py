"""Command results on the terminal: coloured when stdout is a terminal, plain text when piped."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from epo_tui.features import FeatureEntry
from epo_tui.text import inert, token_display
from epo_tui.themes import Theme, load_theme


def _console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def token_cell(token: str, raw_hex: str | None = None, style: str = "") -> Text:
    """One token, inert; each `\\xNN` that stands for a raw byte (known from `raw_hex`) also dim."""
    text = Text()
    for piece, is_byte in token_display(token, raw_hex):
        text.append(piece, style=f"{style} dim".strip() if is_byte else style)
    return text


def _bytes_or_none(token_bytes: list[str] | None, count: int) -> list[str | None]:
    """`token_bytes` when it has one entry per token, else None per token (the strings show as they are)."""
    return list(token_bytes) if token_bytes is not None and len(token_bytes) == count else [None] * count


def activation_text(tokens: list[str], activations: list[float], theme: Theme,
                    token_bytes: list[str] | None = None) -> Text:
    """The tokens run together, each on a background coloured by its activation (0 = no colour)."""
    top = max((a for a in activations if a > 0), default=0.0)
    raw = _bytes_or_none(token_bytes, len(tokens))
    text = Text()
    for token, act, raw_hex in zip(tokens, activations, raw):
        style = f"{theme.activation_text} on {theme.activation_colour(act / top)}" if act > 0 and top else ""
        text.append_text(token_cell(token, raw_hex, style))
    return text


def print_score(scored: dict, feature: int) -> None:
    console = _console()
    tokens, acts, xents = scored["tokens"], scored["activations"], scored["xent"]
    raw = _bytes_or_none(scored.get("token_bytes"), len(tokens))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (("pos", "right"), ("token", "left"), ("id", "right"),
                          (f"act[{feature}]", "right"), ("xent", "right")):
        table.add_column(name, justify=justify)
    theme = load_theme()
    top = max(acts) if acts else 0.0
    for pos, (token, raw_hex, token_id, act, xent) in enumerate(zip(tokens, raw, scored["token_ids"], acts, xents)):
        act_cell = Text(f"{act:.3f}")
        if act > 0 and top > 0:
            act_cell.stylize(f"{theme.activation_text} on {theme.activation_colour(act / top)}")
        table.add_row(str(pos), Text.assemble("'", token_cell(token, raw_hex), "'"), str(token_id), act_cell,
                      "-" if xent is None else f"{xent:.3f}")
    console.print(table)
    if console.is_terminal:
        console.print(activation_text(tokens, acts, theme, raw))
    best = max(range(len(acts)), key=acts.__getitem__)
    scored_xents = [x for x in xents if x is not None]
    mean_xent = sum(scored_xents) / len(scored_xents) if scored_xents else float("nan")
    console.print(f"max act {acts[best]:.3f} at pos {best} ('{inert(tokens[best])}'); "
                  f"mean xent {mean_xent:.3f} over {len(scored_xents)} tokens", markup=False)


def print_features(entries: list[FeatureEntry]) -> None:
    console = _console()
    for entry in entries:
        tokens = "  ".join(f"'{inert(t)}'" for t in entry.top_tokens)  # as `score` quotes them: no doubled \\
        label = f"{inert(entry.label)}  " if entry.label else ""
        dead = "(dead)  " if entry.alive is False else ""  # dead by the SAE's own firing record
        console.print(f"{entry.index:>7}  {dead}{label}{tokens}", markup=False)

"""Prompts as coloured tokens: each token's background says how strongly the latent fires on it.

Plain Rich (no Textual), so the same rendering serves the elites table, the detail panel and any
headless report. Token text is made inert first: a token is model output and may hold escape
sequences, which must show as text and never reach the terminal live. Where a token's raw bytes come
with it (`token_bytes`), each `\\xNN` that stands for part of a UTF-8 character is dim, so it reads
apart from a backslash the text holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.style import Style
from rich.text import Text

from epo_tui.text import token_display
from epo_tui.themes import Theme

LEGEND_BLOCK = "▇"
BYTE_STYLE = Style(dim=True)  # a `\xNN` that stands for a raw byte


def is_firing(activation: float) -> bool:
    """Whether a token gets a colour: only positive activations do (NaN and <= 0 stay plain)."""
    return isinstance(activation, (int, float)) and activation > 0 and math.isfinite(activation)


def scale_max_of(activations: Sequence[float]) -> float:
    """The strongest finite activation in `activations`, or 0.0 when none fires."""
    return max((float(a) for a in activations if is_firing(a)), default=0.0)


def activation_style(activation: float, theme: Theme, scale_max: float) -> Style | None:
    """The style of a token firing at `activation` on a scale topping out at `scale_max`; None: plain."""
    if not is_firing(activation) or not scale_max > 0:
        return None
    return Style(color=theme.activation_text, bgcolor=theme.activation_colour(activation / scale_max))


def activation_text(tokens: Sequence[str], activations: Sequence[float], prompt_start: int, theme: Theme,
                    scale_max: float | None = None, token_bytes: Sequence[str] | None = None) -> Text:
    """The prompt's tokens (from `prompt_start` on: BOS and the prefix left out), coloured by activation.

    `tokens`, `activations` and `token_bytes` (hex per token, optional) cover the whole sequence, as in
    a protocol elite. `scale_max` is the activation shown in the scale's strongest colour; pass one
    shared value to make several prompts comparable (default: the strongest activation of this prompt).
    Each piece of a token (its text, each byte escape) is one span: coloured if it fires, byte escapes dim.
    """
    tokens_T, acts_T = tokens[prompt_start:], activations[prompt_start:]
    usable = token_bytes is not None and len(token_bytes) == len(tokens)  # else (older files): the strings
    raw_T = token_bytes[prompt_start:] if usable else [None] * len(tokens_T)
    if scale_max is None:
        scale_max = scale_max_of(acts_T)
    out = Text(no_wrap=False, end="")
    for token, act, raw in zip(tokens_T, acts_T, raw_T):
        style = activation_style(act, theme, scale_max)
        for piece, is_byte in token_display(token, raw):
            out.append(piece, style=(style or Style()) + BYTE_STYLE if is_byte else style)
    return out


def format_number(value: float) -> str:
    """A short, fixed-ish width number for tables and legends (3 significant digits)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def legend(theme: Theme, scale_max: float) -> Text:
    """The scale's colours between the numbers they stand for, e.g. `0 ▇▇▇▇▇▇ 12.3`."""
    out = Text("0 ", end="")
    for colour in theme.activation_scale:
        out.append(LEGEND_BLOCK, style=Style(color=colour))
    out.append(f" {format_number(scale_max)}")
    return out

"""Command results on the terminal: coloured when stdout is a terminal, plain text when piped."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from epo_tui.features import FeatureEntry
from epo_tui.protocol import Scored
from epo_tui.scored import mean_xent, peak
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


def print_score(scored: Scored) -> None:
    """The per-token table, the coloured text (on a terminal) and a summary line. Only the text's own
    tokens (from `prompt_start`) are coloured and count in the maximum, as in the UI."""
    console = _console()
    tokens, acts, xents, start = scored.tokens, scored.activations, scored.xent, scored.prompt_start
    token_bytes = scored.token_bytes
    raw = list(token_bytes) if len(token_bytes) == len(tokens) else [None] * len(tokens)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (("pos", "right"), ("token", "left"), ("id", "right"),
                          (f"act[{scored.feature}]", "right"), ("xent", "right")):
        table.add_column(name, justify=justify)
    theme = load_theme()
    best = peak(scored)
    top = max(best[1], 0.0) if best else 0.0
    for pos, (token, raw_hex, token_id, act, xent) in enumerate(zip(tokens, raw, scored.token_ids, acts, xents)):
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


REGISTRY_WIDTH = 100  # columns the registry table fits in
_RELEASE_WIDTH = 38  # a longer release name takes a line of its own
_KINDS_AT = 2 + _RELEASE_WIDTH + 1 + 5 + 2 + 6 + 2  # where the kinds column starts
REGISTRY_HEADER = f"{'release':<{2 + _RELEASE_WIDTH}} {'SAEs':>5}  {'loaded':>6}  kinds; why not loaded"


def registry_lines(report: dict) -> list[str]:
    """`epo-tui registry` as lines of at most REGISTRY_WIDTH columns: the releases grouped under their
    model (model type, epo-tui family, weight memory), then the share loaded and the reasons for the rest."""
    import textwrap

    total = report["total"]
    lines = [f"sae-lens {report['sae_lens_version']} registry: {total['releases']} releases, "
             f"{total['saes']:,} SAEs" + (f" (names containing '{inert(report['release_filter'])}')"
                                         if report["release_filter"] else ""), "", REGISTRY_HEADER]
    model = None
    for release in report["releases"]:
        if release["model"] != model:
            model = release["model"]
            lines += textwrap.wrap(_model_line(release), REGISTRY_WIDTH, subsequent_indent="    ")
        name = inert(release["release"])
        numbers = f"{release['saes']:>5}  {release['loaded']:>6}  "
        if len(name) > _RELEASE_WIDTH:
            lines.append(f"  {name}")
            name = ""
        text = textwrap.wrap(_kinds_text(release), REGISTRY_WIDTH - _KINDS_AT) or [""]
        lines.append(f"  {name:<{_RELEASE_WIDTH}} {numbers}{text[0]}".rstrip())
        lines += [" " * _KINDS_AT + more for more in text[1:]]
    lines += ["", f"loaded: {total['loaded']:,} of {total['saes']:,} SAEs ({total['share']:.1%})"]
    if total["not_loaded"]:
        lines.append("not loaded, by reason:")
        lines += [f"  {count:>6,}  {count / total['saes']:>6.1%}  {inert(reason)}"
                  for reason, count in total["not_loaded"].items()]
    supported = report["supported"]
    lines += textwrap.wrap(f"epo-tui loads model types {', '.join(supported['model_types'])}; architectures "
                           f"{', '.join(supported['architectures'])}", REGISTRY_WIDTH, subsequent_indent="    ")
    return lines


def _model_line(release: dict) -> str:
    if release["model_type"] is None:
        return f"{inert(release['model'])} (not in epo-tui's table of models)"
    family = f"family {release['family']}" if release["family"] else "not supported"
    note = f"; {release['model_note']}" if release["model_note"] else ""
    return (f"{inert(release['model'])} ({release['model_type']}: {family}; "
            f"{release['weights_gb_bf16']:.1f} GB in bf16{note})")


def _kinds_text(release: dict) -> str:
    """`topk`, or `jumprelu_skip_transcoder 246, jumprelu_transcoder 245; hook attn.hook_z 12` (counts
    only where a release holds several kinds or reasons). An unsupported model type is said once, on
    the model's line."""
    kinds: dict[str, int] = {}
    for kind in release["kinds"]:  # one label can cover several hooks
        kinds[kind["kind"]] = kinds.get(kind["kind"], 0) + kind["saes"]
    text = ", ".join(k if len(kinds) == 1 else f"{k} {n}" for k, n in kinds.items())
    reasons = {r: n for r, n in release["not_loaded"].items() if r != f"model type {release['model_type']}"}
    if reasons:
        whole = len(reasons) == 1 and release["loaded"] == 0
        text += "; " + ", ".join(r if whole else f"{r} {n}" for r, n in reasons.items())
    return inert(text)


def print_registry(report: dict) -> None:
    print("\n".join(registry_lines(report)))

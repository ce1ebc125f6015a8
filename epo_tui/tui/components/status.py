"""The status bar: what runs where, and how far it is."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from epo_tui.budget import eta_seconds
from epo_tui.text import inert


def eta_text(iteration: int | None, total: int | None, rate: float | None, budget_left: float | None = None) -> str:
    """`ETA 3m12s` from iterations left and iterations per second, or from the time budget left when
    that ends the search sooner; empty when unknown."""
    if not iteration or not total or not rate or rate <= 0 or iteration >= total:
        return ""
    seconds = round(eta_seconds(total - iteration, 1 / rate, budget_left))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return "ETA " + (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s")


class StatusBar(Static):
    """One line: state · iteration i/N · it/s · ETA · feature · model / SAE @ hook · devices.

    `show(**fields)` updates any of: state, devices, model, sae, hook, label, session, iteration, total,
    rate, budget_left, versus_dataset (e.g. "best 1.24× dataset max at xent 4.1"); the rest keep their
    values."""

    DEFAULT_CSS = "StatusBar { height: 1; background: $panel; color: $foreground; padding: 0 1; }"

    def __init__(self, **kwargs: Any):
        super().__init__("", **kwargs)
        self.fields: dict[str, Any] = {}

    def show(self, **fields: Any) -> None:
        self.fields.update(fields)
        self.update(self.line_text())

    def line_text(self) -> Text:
        """Most urgent first, so a narrow terminal cuts the least useful end: where the search is, then
        what it searches, then what it runs on."""
        f = self.fields
        parts = [f.get("state", "")]
        if f.get("total"):
            parts.append(f"iteration {f.get('iteration') or 0}/{f['total']}")
        if f.get("rate"):
            parts.append(f"{f['rate']:.2f} it/s")
        eta = eta_text(f.get("iteration"), f.get("total"), f.get("rate"), f.get("budget_left"))
        if eta:
            parts.append(eta)
        if f.get("versus_dataset"):
            parts.append(f["versus_dataset"])
        if f.get("label"):
            parts.append(f["label"])
        if f.get("model"):
            parts.append(f"{_short(f['model'])} / {_short(f.get('sae', ''))} @ {f.get('hook', '')}")
        if f.get("devices"):
            parts.append(f["devices"])
        return Text(inert(" · ".join(p for p in parts if p)), no_wrap=True, overflow="ellipsis")


def _short(path_or_name: str) -> str:
    """The last two parts of a path (a hub id stays whole)."""
    parts = [p for p in str(path_or_name).split("/") if p]
    return "/".join(parts[-2:]) if parts else ""

"""Time budgets: `search.time_budget` / `--time-budget` ("90", "90s", "2m", "1m30s", "1h") as seconds,
and the deadline a search checks between iterations.

Plain Python (no jax): the config, the CLI, the worker and the engine's loops share it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

EXAMPLES = "90, 90s, 2m, 1m30s or 1h"
NO_BUDGET = ("", "none")  # what a config or a flag writes for "no time budget"
_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"(?:({_NUMBER})\s*h)?\s*(?:({_NUMBER})\s*m)?\s*(?:({_NUMBER})\s*s)?")


def budget_seconds(text: str) -> float | None:
    """Seconds of a time budget, None for no budget ("" or "none"). ValueError (a message without the
    key or flag, for the caller to name) for anything else, zero included."""
    cleaned = text.strip().lower()
    if cleaned in NO_BUDGET:
        return None
    if re.fullmatch(_NUMBER, cleaned):  # plain seconds
        seconds = float(cleaned)
    else:
        match = _DURATION.fullmatch(cleaned)
        if match is None or not any(match.groups()):
            raise ValueError(f"expected a duration such as {EXAMPLES}, found '{text}'")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be more than 0 s, found '{text}'")
    return seconds


def format_budget(seconds: float) -> str:
    """Seconds as budget_seconds reads them back, to the millisecond: 120 -> "2m", 90 -> "1m30s",
    12.5 -> "12.5s", 3600 -> "1h"."""
    ms = max(1, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if ms else ""]
    return "".join(parts)


def eta_seconds(iterations_left: int, seconds_per_iteration: float | None, budget_left: float | None) -> float | None:
    """Seconds until a search ends: its iterations left at `seconds_per_iteration`, or the time budget
    left when that ends it sooner; None when neither is known. The one rule behind every ETA shown (the
    headless progress bar and the UI's status bar)."""
    by_iterations = None if seconds_per_iteration is None else iterations_left * seconds_per_iteration
    if budget_left is None or by_iterations is None:
        return by_iterations if budget_left is None else budget_left
    return min(by_iterations, budget_left)


def now() -> float:
    """The clock deadlines read (tests replace it with a fake one)."""
    return time.monotonic()


class Deadline:
    """A time budget counted from `started` (default: now); paused time does not count. With
    `seconds` None there is no budget: it never expires."""

    def __init__(self, seconds: float | None, started: float | None = None, clock: Callable[[], float] | None = None):
        self.seconds = seconds
        self.clock = clock or now
        self.started = self.clock() if started is None else started
        self._paused_at: float | None = None
        self._paused_s = 0.0

    def spent_s(self) -> float:
        end = self._paused_at if self._paused_at is not None else self.clock()
        return end - self.started - self._paused_s

    def left_s(self) -> float | None:
        """Seconds left (0 once spent); None without a budget."""
        return None if self.seconds is None else max(0.0, self.seconds - self.spent_s())

    @property
    def expired(self) -> bool:
        return self.seconds is not None and self.spent_s() >= self.seconds

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self.clock()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_s += self.clock() - self._paused_at
            self._paused_at = None

    def describe(self) -> str:
        """The budget as a user wrote it, e.g. "2m" ("" without one)."""
        return "" if self.seconds is None else format_budget(self.seconds)

"""The Pareto frontier of prompts on the design's axes, (xent, act): lower xent (more fluent) and higher
act are better. Plain Python, shared by the UI's chart and the worker's answer about a saved session, so
both keep the same points under the same cap."""

from __future__ import annotations

import bisect
import math
from typing import Generic, Protocol, TypeVar

FRONTIER_MAX_POINTS = 2000  # beyond this a frontier is thinned: a chart needs its shape, not every point


class HasXentAct(Protocol):
    @property
    def xent(self) -> float: ...

    @property
    def act(self) -> float: ...


Point = TypeVar("Point", bound=HasXentAct)


class ParetoFrontier(Generic[Point]):
    """The non-dominated set of (xent, act) points: lower xent (more fluent) and higher act are better.

    Kept sorted by xent; along a frontier act then strictly increases with xent, so a new point is
    dominated iff its left neighbour already has act >= its act, and the points it dominates are a
    contiguous run to its right. Beyond `max_points`, the set is thinned evenly along xent (ends kept):
    the chart needs the shape, not every point.
    """

    def __init__(self, max_points: int = FRONTIER_MAX_POINTS) -> None:
        self.max_points = max_points
        self._xents: list[float] = []  # sorted; parallel to _points, for bisect
        self._points: list[Point] = []

    def __len__(self) -> int:
        return len(self._points)

    @property
    def points(self) -> list[Point]:
        return list(self._points)

    def clear(self) -> None:
        self._xents.clear()
        self._points.clear()

    def add(self, point: Point) -> bool:
        """Adds `point` unless it is dominated (or equal to a kept point); True if it was added."""
        if not (math.isfinite(point.xent) and math.isfinite(point.act)):
            return False
        right = bisect.bisect_right(self._xents, point.xent)
        if right > 0 and self._points[right - 1].act >= point.act:
            return False
        i = end = bisect.bisect_left(self._xents, point.xent)  # a kept point at the same xent goes too
        while end < len(self._points) and self._points[end].act <= point.act:
            end += 1
        self._xents[i:end] = [point.xent]
        self._points[i:end] = [point]
        if len(self._points) > self.max_points:
            self._thin()
        return True

    def _thin(self) -> None:
        chosen = thinned_ranks(len(self._points), self.max_points)
        self._points = [self._points[j] for j in chosen]
        self._xents = [p.xent for p in self._points]


def thinned_ranks(n: int, max_points: int) -> list[int]:
    """The ranks (along xent) a frontier of `n` points over `max_points` keeps: 3/4 of `max_points`, evenly
    spaced, both ends included (the most fluent and the most active prompt), so thinning happens rarely."""
    keep = max(2, max_points * 3 // 4)
    return sorted({round(j * (n - 1) / (keep - 1)) for j in range(keep)})

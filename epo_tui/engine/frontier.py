"""The Pareto frontier of (xent, act) over every distinct prompt seen (DESIGN.md §3): low xent, high act,
as the chart draws it; the objective of each point is kept alongside. Arrays, for the children of a
whole iteration at once; the plain-Python frontier of the chart and of the sessions is epo_tui.pareto,
with the same axes and the same cap."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from epo_tui.pareto import FRONTIER_MAX_POINTS, thinned_ranks


@dataclass
class Frontier:
    xent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    objective: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    act: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # reported activation
    tokens: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))

    def __len__(self) -> int:
        return len(self.xent)

    def candidates_that_enter(self, xent, act) -> np.ndarray:
        """Indices of new points not dominated by the frontier or by each other (before dedup)."""
        keep = nondominated(np.concatenate([self.xent, xent]), np.concatenate([self.act, act]))
        return keep[keep >= len(self)] - len(self)

    def merged(self, xent, objective, act, tokens) -> Frontier:
        """The frontier of the current points and the new ones (distinct prompts only)."""
        tokens = np.asarray(tokens, np.int32)
        all_tokens = tokens if len(self) == 0 else np.concatenate([self.tokens, tokens])
        arrays = [np.concatenate([old, np.asarray(new, np.float32)])
                  for old, new in ((self.xent, xent), (self.objective, objective), (self.act, act))]
        _, first = np.unique(all_tokens, axis=0, return_index=True)  # distinct prompts
        first = np.sort(first)
        arrays, all_tokens = [a[first] for a in arrays], all_tokens[first]
        keep = nondominated(arrays[0], arrays[2])
        if len(keep) > FRONTIER_MAX_POINTS:
            keep = keep[thinned_ranks(len(keep), FRONTIER_MAX_POINTS)]
        return Frontier(*(a[keep] for a in arrays), tokens=all_tokens[keep])

    def to_json(self, tokens_to_text=None) -> list[dict]:
        rows = []
        for i in range(len(self)):
            row = {"xent": float(self.xent[i]), "objective": float(self.objective[i]), "act": float(self.act[i]),
                   "token_ids": self.tokens[i].tolist()}
            if tokens_to_text is not None:
                row["text"] = tokens_to_text(self.tokens[i])
            rows.append(row)
        return rows


def nondominated(xent: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Indices (sorted by xent) of points no other point beats on both: lower-or-equal xent with a
    higher act. Among exact ties, the first index is kept."""
    order = np.lexsort((np.arange(len(xent)), -act, xent))  # xent up, then act down
    best_so_far = -np.inf
    keep = []
    for i in order:
        if act[i] > best_so_far:
            keep.append(i)
            best_so_far = act[i]
    return np.asarray(keep, dtype=np.int64)

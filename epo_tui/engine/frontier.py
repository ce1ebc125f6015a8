"""The Pareto frontier of (xent, objective) over every distinct prompt seen: low xent, high objective."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_POINTS = 1024  # a 2-D frontier rarely gets near this; past it, every other point is dropped


@dataclass
class Frontier:
    xent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    objective: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    act: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # reported activation
    tokens: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))

    def __len__(self) -> int:
        return len(self.xent)

    def candidates_that_enter(self, xent, objective) -> np.ndarray:
        """Indices of new points not dominated by the frontier or by each other (before dedup)."""
        all_xent = np.concatenate([self.xent, xent])
        all_obj = np.concatenate([self.objective, objective])
        keep = nondominated(all_xent, all_obj)
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
        keep = nondominated(arrays[0], arrays[1])
        if len(keep) > MAX_POINTS:
            keep = keep[:: int(np.ceil(len(keep) / MAX_POINTS))]
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


def nondominated(xent: np.ndarray, objective: np.ndarray) -> np.ndarray:
    """Indices (sorted by xent) of points no other point beats on both: lower-or-equal xent with a
    higher objective. Among exact ties, the first index is kept."""
    order = np.lexsort((np.arange(len(xent)), -objective, xent))  # xent up, then objective down
    best_so_far = -np.inf
    keep = []
    for i in order:
        if objective[i] > best_so_far:
            keep.append(i)
            best_so_far = objective[i]
    return np.asarray(keep, dtype=np.int64)

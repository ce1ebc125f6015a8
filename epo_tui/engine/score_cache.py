"""Scores of prompts a search has already run, so that a child proposed again is not run again.

Bounded and first-in first-out. It is part of the search's state (and of its checkpoints): a score read
from here is the one first computed, which can differ in the last bits from running the prompt again
in another batch, so a resumed search must hold the same entries to stay the search it continues.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

CAPACITY = 32_768  # prompts; about 20 iterations of the default 8 x 128 search, 3 MB at 20 tokens


class ScoreCache:
    """prompt (its N token ids) -> (objective, act, xent), the oldest dropped past `capacity`."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._scores: OrderedDict[bytes, tuple[float, float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._scores)

    def get(self, key: bytes) -> tuple[float, float, float] | None:
        return self._scores.get(key)

    def add(self, tokens_BxN: np.ndarray, objective_B, act_B, xent_B) -> None:
        """Remembers these prompts' scores (a prompt already held keeps its first score and place)."""
        tokens_BxN = np.asarray(tokens_BxN, np.int32)
        for row, scores in zip(tokens_BxN, zip(*(np.asarray(a, np.float32) for a in (objective_B, act_B, xent_B)))):
            self._scores.setdefault(row.tobytes(), tuple(scores))
        while len(self._scores) > self.capacity:
            self._scores.popitem(last=False)

    def copy(self) -> ScoreCache:
        twin = ScoreCache(self.capacity)
        twin._scores = self._scores.copy()
        return twin

    def to_arrays(self, prompt_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_MxN int32, scores_Mx3 float32: objective, act, xent), oldest first."""
        tokens = np.frombuffer(b"".join(self._scores), np.int32).reshape(len(self._scores), prompt_tokens)
        scores = np.array(list(self._scores.values()), np.float32).reshape(len(self._scores), 3)
        return tokens, scores

    @classmethod
    def from_arrays(cls, tokens_MxN: np.ndarray, scores_Mx3: np.ndarray, capacity: int = CAPACITY) -> ScoreCache:
        cache = cls(capacity)
        scores_Mx3 = np.asarray(scores_Mx3, np.float32).reshape(-1, 3)
        cache.add(tokens_MxN, scores_Mx3[:, 0], scores_Mx3[:, 1], scores_Mx3[:, 2])
        return cache

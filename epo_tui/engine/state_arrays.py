"""A search's state as plain arrays, for session checkpoints, and back: an exact resume.

Each step draws its randomness from fold_in(key, iteration), so the arrays below (the elites, the
key, the frontier, the best-objective history and the scores already computed) are everything the
next iteration depends on. Checkpoints written before the score cache existed resume with it empty.
"""

from __future__ import annotations

import numpy as np

from epo_tui.engine.frontier import Frontier
from epo_tui.engine.score_cache import ScoreCache
from epo_tui.engine.search import SearchState

STATE_KEYS = ("iteration", "tokens_KxN", "objective_K", "act_K", "xent_K", "key", "frontier_xent",
              "frontier_objective", "frontier_act", "frontier_tokens", "best_objective_history")


def state_arrays(state: SearchState) -> dict[str, np.ndarray]:
    f = state.frontier
    n_tokens = state.tokens_KxN.shape[1]
    scored_tokens, scored_values = state.scored.to_arrays(n_tokens)
    return {
        "iteration": np.asarray([state.iteration], np.int64),
        "tokens_KxN": np.asarray(state.tokens_KxN, np.int32),
        "objective_K": np.asarray(state.objective_K, np.float32),
        "act_K": np.asarray(state.act_K, np.float32),
        "xent_K": np.asarray(state.xent_K, np.float32),
        "key": np.asarray(state.key, np.uint32),
        "frontier_xent": np.asarray(f.xent, np.float32),
        "frontier_objective": np.asarray(f.objective, np.float32),
        "frontier_act": np.asarray(f.act, np.float32),
        "frontier_tokens": np.asarray(f.tokens, np.int32).reshape(len(f), n_tokens),
        "best_objective_history": np.asarray(state.best_objective_history, np.float32),
        "scored_tokens": scored_tokens,
        "scored_values": scored_values,
    }


def state_from_arrays(arrays: dict[str, np.ndarray], elites: int, prompt_tokens: int) -> SearchState:
    """The state back; ValueError when the arrays do not fit a search of these sizes."""
    missing = [name for name in STATE_KEYS if name not in arrays]
    if missing:
        raise ValueError(f"the checkpoint has no {', '.join(missing)}")
    tokens = np.asarray(arrays["tokens_KxN"], np.int32)
    if tokens.shape != (elites, prompt_tokens):
        raise ValueError(f"the checkpoint holds {tokens.shape[0]} elites x {tokens.shape[1]} tokens, the search "
                         f"{elites} x {prompt_tokens}")
    frontier_tokens = np.asarray(arrays["frontier_tokens"], np.int32)
    frontier = Frontier(xent=np.asarray(arrays["frontier_xent"], np.float32),
                        objective=np.asarray(arrays["frontier_objective"], np.float32),
                        act=np.asarray(arrays["frontier_act"], np.float32),
                        tokens=frontier_tokens if len(frontier_tokens) else np.zeros((0, 0), np.int32))
    return SearchState(iteration=int(arrays["iteration"][0]), tokens_KxN=tokens,
                       objective_K=np.asarray(arrays["objective_K"], np.float32),
                       act_K=np.asarray(arrays["act_K"], np.float32),
                       xent_K=np.asarray(arrays["xent_K"], np.float32),
                       key=np.asarray(arrays["key"], np.uint32), frontier=frontier,
                       best_objective_history=[float(x) for x in arrays["best_objective_history"]],
                       scored=_score_cache(arrays, prompt_tokens))


def _score_cache(arrays: dict[str, np.ndarray], prompt_tokens: int) -> ScoreCache:
    if "scored_tokens" not in arrays or "scored_values" not in arrays:  # an older checkpoint
        return ScoreCache()
    tokens = np.asarray(arrays["scored_tokens"], np.int32)
    values = np.asarray(arrays["scored_values"], np.float32)
    if tokens.ndim != 2 or tokens.shape[1:] != (prompt_tokens,) or values.shape != (len(tokens), 3):
        raise ValueError(f"the checkpoint's score cache is shaped {tokens.shape} and {values.shape}, the search "
                         f"holds prompts of {prompt_tokens} tokens")
    return ScoreCache.from_arrays(tokens, values)


def new_frontier_points(before: Frontier, after: Frontier) -> np.ndarray:
    """Indices into `after` of points that were not on `before` (by prompt)."""
    if len(after) == 0:
        return np.zeros(0, np.int64)
    seen = {row.tobytes() for row in np.asarray(before.tokens, np.int32)} if len(before) else set()
    return np.array([i for i, row in enumerate(np.asarray(after.tokens, np.int32)) if row.tobytes() not in seen],
                    np.int64)

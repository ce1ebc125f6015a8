"""The scores a search has already computed: bounded, first in first out, and carried exactly through a
checkpoint so that a resumed search reuses the same scores as the one that kept going."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from epo_tui.config import load_config
from epo_tui.engine.state_arrays import state_arrays, state_from_arrays
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.score_cache import ScoreCache
from epo_tui.engine.search import Search
from epo_tui.engine.tiny import main as write_tiny


def _rows(*rows):
    return np.array(rows, np.int32)


def test_the_oldest_prompts_go_first_and_a_prompt_keeps_its_first_score():
    cache = ScoreCache(capacity=3)
    cache.add(_rows([1, 2], [3, 4]), [1.0, 2.0], [0.5, 0.6], [4.0, 5.0])
    cache.add(_rows([1, 2], [5, 6]), [9.0, 3.0], [9.0, 0.7], [9.0, 6.0])  # [1, 2] is held already
    assert cache.get(_rows([1, 2])[0].tobytes()) == (1.0, 0.5, 4.0)
    cache.add(_rows([7, 8]), [4.0], [0.8], [7.0])
    assert len(cache) == 3 and cache.get(_rows([1, 2])[0].tobytes()) is None
    tokens, scores = cache.to_arrays(2)
    assert tokens.tolist() == [[3, 4], [5, 6], [7, 8]] and tokens.dtype == np.int32
    np.testing.assert_array_equal(scores, np.float32([[2.0, 0.6, 5.0], [3.0, 0.7, 6.0], [4.0, 0.8, 7.0]]))
    back = ScoreCache.from_arrays(tokens, scores, capacity=3)
    assert [back.get(row.tobytes()) for row in tokens] == [cache.get(row.tobytes()) for row in tokens]
    twin = cache.copy()
    twin.add(_rows([9, 9]), [1.0], [1.0], [1.0])
    assert len(cache) == 3 and cache.get(_rows([9, 9])[0].tobytes()) is None


def test_an_empty_cache_has_empty_arrays():
    tokens, scores = ScoreCache().to_arrays(20)
    assert tokens.shape == (0, 20) and scores.shape == (0, 3)


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> Search:
    folder = tmp_path_factory.mktemp("tiny")
    assert write_tiny([str(folder)]) == 0
    config = load_config(str(folder / "config.toml"))
    config = replace(config, search=replace(config.search, elites=4, candidates=16, prompt_tokens=8))
    return Search(load_model_with_sae(config), config)


def test_a_search_resumed_from_its_checkpoint_arrays_steps_exactly_like_the_one_that_kept_going(search):
    state = search.initial_state()
    for _ in range(3):
        state, _ = search.step(state)
    assert len(state.scored) > len(state.tokens_KxN)
    resumed = state_from_arrays(state_arrays(state), 4, 8)
    assert state_arrays(resumed).keys() == state_arrays(state).keys()
    for name, array in state_arrays(state).items():
        np.testing.assert_array_equal(state_arrays(resumed)[name], array, err_msg=name)
    kept, _ = search.step(state)
    again, _ = search.step(resumed)
    for name, array in state_arrays(kept).items():
        np.testing.assert_array_equal(state_arrays(again)[name], array, err_msg=name)


def test_a_checkpoint_from_before_the_cache_resumes_with_it_empty_and_a_misshapen_one_is_refused(search):
    state, _ = search.step(search.initial_state())
    arrays = state_arrays(state)
    older = {name: array for name, array in arrays.items() if not name.startswith("scored_")}
    assert len(state_from_arrays(older, 4, 8).scored) == 0
    with pytest.raises(ValueError, match="score cache"):
        state_from_arrays({**arrays, "scored_tokens": arrays["scored_tokens"][:, :5]}, 4, 8)

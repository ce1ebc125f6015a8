"""Starting elites: sampled from the model, and valid (re-tokenizing) even when sampling rarely is."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import epo_tui.engine.sampling as sampling_module
from epo_tui.config import load_config
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.search import Search


@pytest.fixture(scope="module")
def search(tiny_dir):
    config = load_config(str(tiny_dir / "config.toml"))
    return Search(load_model_with_sae(config), config)


def _invalid_token(search: Search) -> int:
    """A token whose text alone does not re-tokenize to it (a lone byte of a multi-byte character)."""
    allowed = np.flatnonzero(~np.asarray(search.banned_V))
    return int(next(t for t in allowed if not search.is_valid(np.array([t]))))


def test_starting_elites_are_model_samples_that_re_tokenize(search):
    state = search.initial_state()
    assert all(search.is_valid(row) for row in state.tokens_KxN)
    assert state.iteration == 0 and np.isfinite(state.xent_K).all()


def test_when_samples_never_re_tokenize_a_prompt_is_built_token_by_token(search, monkeypatch):
    bad = _invalid_token(search)
    monkeypatch.setattr(sampling_module, "sample_continuations",
                        lambda *args, **kwargs: jnp.full((search.st.elites, search.st.prompt_tokens), bad))
    state = search.initial_state()
    assert all(search.is_valid(row) for row in state.tokens_KxN)
    assert (state.tokens_KxN == state.tokens_KxN[0]).all()  # one built prompt, copied to every elite


def test_elites_without_a_valid_sample_copy_one_that_has(search, monkeypatch):
    bad = _invalid_token(search)
    good = search.initial_state().tokens_KxN[0]

    def one_valid_row(*args, **kwargs):
        rows = np.full((search.st.elites, search.st.prompt_tokens), bad, np.int32)
        rows[2] = good
        return jnp.asarray(rows)

    monkeypatch.setattr(sampling_module, "sample_continuations", one_valid_row)
    state = search.initial_state()
    assert (state.tokens_KxN == good).all()

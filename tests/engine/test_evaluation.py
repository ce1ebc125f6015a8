"""The search's evaluation: children scored from their first change on (reusing their parent's pass),
repeats scored once, equal to running every position of every child."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epo_tui.config import load_config
from epo_tui.engine.evaluation import bucket_starts, first_changes
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.language_model import run_model
from epo_tui.engine.reporting import elite_reports
from epo_tui.engine.sampling import cached_step, empty_cache, sample_continuations
from epo_tui.engine.search import Search, gradients, propose
from epo_tui.engine.tiny import main as write_tiny

ATOL = 1e-4
# every family; the sliding-window ones attend across a window (4) shorter than prefix + prompt
FAST = ("gpt2", "gemma3_text")
SLOW = ("gemma", "gemma2", "gpt_neox", "llama", "mistral", "qwen3", "qwen3_moe")


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    made = {}

    def setup(family: str):
        if family not in made:
            folder = tmp_path_factory.mktemp(family)
            assert write_tiny([str(folder), "--family", family]) == 0
            config = load_config(str(folder / "config.toml"))
            made[family] = (config, load_model_with_sae(config))
        return made[family]

    return setup


def _search(config, pair, feature=None, **search) -> Search:
    search = {"prompt_tokens": 10, "prefix": "The quick brown", "elites": 4, "candidates": 16, **search}
    config = replace(config, search=replace(config.search, **search))
    if feature:
        config = replace(config, feature=replace(config.feature, **feature))
    return Search(pair, config)


def _children_both_ways(search: Search, iterations: int = 4):
    """Per iteration: (children, fast scores, plain scores, what the fast route ran); the fast route
    knows the scores of the prompts the search has run so far."""
    state = search.initial_state("The quick brown fox jumps over")
    out = []
    for i in range(iterations):
        key = jax.random.fold_in(jax.random.key(7), i)
        tokens = jnp.asarray(state.tokens_KxN)
        grads, parents = gradients(search.params, search.sae, search.arrays, search.prefix, tokens,
                                   jnp.asarray(search.lambdas_K), st=search.st)
        children = np.asarray(propose(key, tokens, grads, parents.next_logits_KxNxV, search.banned_V,
                                      st=search.st)).reshape(-1, search.st.prompt_tokens)
        fast = search.evaluate_children(children, state, parents, state.scored.copy())
        out.append((children, fast, search.evaluate(children), search.scorer.last))
        state, _ = search.step(state)
    return out


def _assert_same(runs):
    """Fast and plain scores agree, and some child ran from a later start. Whether a child repeats
    (and is not run) depends on the family's random weights: the repeats' own tests are below."""
    starts = set()
    for children, fast, plain, counts in runs:
        for name, a, b in zip(("objective", "act", "xent"), fast, plain):
            np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=name)
        starts |= set(counts.calls)
    assert starts - {0}, "no child ran from a later start"


@pytest.mark.parametrize("family", [*FAST, *(pytest.param(f, marks=pytest.mark.slow) for f in SLOW)])
def test_children_from_their_first_change_equal_the_plain_forward(setups, family):
    config, pair = setups(family)
    _assert_same(_children_both_ways(_search(config, pair)))


@pytest.mark.parametrize("feature", [
    {"kind": "logit", "index": 5},  # reads the logits at every position, the last one included
    {"indices": (0, 1, 2), "read": "max", "combine": "lp"},  # several latents, the largest position
    {"kind": "neuron", "index": 3, "hook": "blocks.1.mlp.hook_post"},
])
def test_every_target_kind_scores_the_same_either_way(setups, feature):
    config, pair = setups("gpt2")
    _assert_same(_children_both_ways(_search(config, pair, feature=feature)))


def test_a_bfloat16_model_scores_children_close_to_the_plain_forward(setups, tmp_path):
    config, _ = setups("gpt2")
    config = replace(config, model=replace(config.model, dtype="bfloat16"))
    for children, fast, plain, _ in _children_both_ways(_search(config, load_model_with_sae(config)), 2):
        for a, b in zip(fast, plain):  # bfloat16 rounding of a different batch shape, not a different sum
            np.testing.assert_allclose(a, b, atol=5e-2, rtol=2e-2)


def test_a_bfloat16_search_reports_its_elites_in_float32(setups):
    """It selects by its own bfloat16 figures, but each elite's reported act, xent, objective and
    per-position activations are those of a float32 pass over the same (bfloat16-valued) weights."""
    config, _ = setups("gpt2")
    config16 = replace(config, model=replace(config.model, dtype="bfloat16"))
    pair16 = load_model_with_sae(config16)
    assert pair16.model.dtype == "bfloat16"
    search16 = _search(config16, pair16)
    state = search16.initial_state("The quick brown fox jumps over")
    for _ in range(2):
        state, _ = search16.step(state)
    reports = elite_reports(search16, state)

    as_float32 = jax.tree.map(lambda a: np.asarray(a, np.float32), pair16.model.params)
    pair32 = replace(pair16, model=replace(pair16.model, params=as_float32, dtype="float32"), _replicas={})
    search32 = _search(config16, pair32)
    expected = dict(zip(("objective", "act", "xent"), search32.evaluate(state.tokens_KxN)))
    for name, values in expected.items():
        np.testing.assert_allclose([getattr(r, name) for r in reports], values, atol=ATOL, rtol=0, err_msg=name)
    plain = elite_reports(search32, state)
    np.testing.assert_allclose([r.activations for r in reports], [r.activations for r in plain], atol=ATOL)
    # the search's own figures are bfloat16's: the reports were recomputed, not copied (they sit closer
    # to float32's than the search's own do; how much closer depends on which prompts the search kept)
    own = np.concatenate([state.objective_K, state.act_K, state.xent_K])
    reported = np.array([getattr(r, name) for name in expected for r in reports])
    float32 = np.concatenate(list(expected.values()))
    assert np.abs(own - float32).max() > 10 * np.abs(reported - float32).max()


def test_repeats_in_a_batch_run_once_and_a_batch_always_scores_the_same(setups):
    config, pair = setups("gpt2")
    search = _search(config, pair)
    state = search.initial_state("The quick brown fox jumps over")
    grads, parents = gradients(search.params, search.sae, search.arrays, search.prefix,
                               jnp.asarray(state.tokens_KxN), jnp.asarray(search.lambdas_K), st=search.st)
    K, N = state.tokens_KxN.shape
    children = np.repeat(state.tokens_KxN, search.st.candidates, axis=0)  # every child its parent, at first
    children[::2, -1] = (children[::2, -1] + 1) % 40 + 50  # half change their last token...
    children[1::4] = children[0]  # ...and a quarter repeat the first child (a child of elite 0)
    first = search.evaluate_children(children, state, parents)
    counts = search.scorer.last
    distinct_changed = {row.tobytes() for row, f in zip(children, first_changes(children, np.repeat(
        state.tokens_KxN, search.st.candidates, axis=0))) if f < N}
    assert counts.run == len(distinct_changed)
    again = search.evaluate_children(children, state, parents)  # as a resumed search would score it
    assert search.scorer.last.run == counts.run
    for a, b, c in zip(first, again, search.evaluate(children)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=ATOL, rtol=0)
    # a child equal to its parent carries the parent's own score
    unchanged = np.flatnonzero((children == np.repeat(state.tokens_KxN, search.st.candidates, axis=0)).all(-1))
    np.testing.assert_array_equal(first[0][unchanged], state.objective_K[unchanged // search.st.candidates])


def test_children_scored_in_an_earlier_iteration_are_not_run_again_and_keep_their_scores(setups):
    config, pair = setups("gpt2")
    search = _search(config, pair)
    st = search.st
    state = search.initial_state("The quick brown fox jumps over")
    tokens = jnp.asarray(state.tokens_KxN)
    grads, parents = gradients(search.params, search.sae, search.arrays, search.prefix, tokens,
                               jnp.asarray(search.lambdas_K), st=st)

    def children(seed):
        return np.asarray(propose(jax.random.key(seed), tokens, grads, parents.next_logits_KxNxV, search.banned_V,
                                  st=st)).reshape(-1, st.prompt_tokens)

    scored = state.scored.copy()
    old = children(1)
    first = search.evaluate_children(old, state, parents, scored)
    assert 0 < search.scorer.last.run and len(scored) == len(state.scored) + search.scorer.last.run
    # every second old child again, then new ones: only new ones run, the old keep their first scores bitwise
    half = len(old) // 2
    second = search.evaluate_children(np.concatenate([old[::2], children(2)[::2]]), state, parents, scored)
    parent_B = np.repeat(np.arange(st.elites), st.candidates)
    ran_before = {row.tobytes() for row, f in zip(old, first_changes(old, state.tokens_KxN[parent_B]))
                  if f < st.prompt_tokens}
    assert search.scorer.last.known >= len(ran_before & {row.tobytes() for row in old[::2]}) > 0
    for name, a, b in zip(("objective", "act", "xent"), second, first):
        np.testing.assert_array_equal(a[:half], b[::2], err_msg=name)
    for name, a, b in zip(("objective", "act", "xent"), second,
                          search.evaluate(np.concatenate([old[::2], children(2)[::2]]))):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=name)


def test_bucket_starts_and_first_changes():
    assert bucket_starts(20) == (0, 2, 4, 6, 8, 10, 12, 14, 16, 18)
    assert bucket_starts(6) == (0, 1, 2, 3, 4, 5)
    assert bucket_starts(1) == (0,)
    parents = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    children = np.array([[1, 2, 3], [1, 9, 3], [9, 2, 3]])
    assert first_changes(children, parents).tolist() == [3, 1, 0]


@pytest.mark.parametrize("family", [*FAST, *(pytest.param(f, marks=pytest.mark.slow) for f in SLOW)])
def test_a_kv_cache_step_by_step_gives_the_full_forward_logits_and_the_sampler_uses_it(setups, family):
    """Starting elites are sampled one token per step against a KV cache. Fed a prompt token by token,
    the cache's logits equal one full forward's at every position (past the sliding windows too), and
    each token the sampler picks is the full forward's pick with the same key (categorical = argmax of
    the logits plus that key's Gumbel noise)."""
    config, pair = setups(family)
    search = _search(config, pair)
    st, K, N, n_start = search.st, search.st.elites, search.st.prompt_tokens, 2
    start = np.zeros((K, N), np.int32)
    start[:, :n_start] = pair.model.prompt_ids(" fox jumps")[:n_start]
    key = jax.random.key(3)
    sampled = np.asarray(sample_continuations(search.params, search.prefix, key, jnp.asarray(start), n_start,
                                               search.banned_V, st=st))
    assert (sampled[:, :n_start] == start[:, :n_start]).all()
    P = len(search.prefix_ids)
    full = np.concatenate([np.broadcast_to(np.asarray(search.prefix_ids, np.int32), (K, P)), sampled], axis=1)
    logits_KxLxV, _, _ = run_model(search.params, jnp.asarray(full), model_type=st.model_type, cfg=st.cfg, hooks=(),
                                   logits=True, center_writes=st.center_writes)
    expected_KxNxV = np.asarray(logits_KxLxV, np.float32)[:, P:]
    cache, step = empty_cache(search.prefix, K, N), jax.jit(cached_step, static_argnames=("st",))
    for j in range(N):
        logits_KxV, cache = step(search.params, cache, jnp.asarray(sampled[:, j:j + 1]), st=st)
        np.testing.assert_allclose(np.asarray(logits_KxV, np.float32), expected_KxNxV[:, j], atol=ATOL, rtol=0,
                                   err_msg=f"after position {j}")
    banned = np.asarray(search.banned_V)
    for j in range(n_start, N):
        before = np.asarray(logits_KxLxV, np.float32)[:, P + j - 1]
        gumbel = np.asarray(jax.random.gumbel(jax.random.fold_in(key, j), before.shape))
        np.testing.assert_array_equal(sampled[:, j], np.argmax(np.where(banned, -np.inf, before) + gumbel, axis=-1),
                                      err_msg=f"position {j}")

"""The EPO search (DESIGN.md §3), checked against brute force, an independent forward pass, exact
selection rules and the proposal distribution's own statistics.

Models: the session's tiny GPT-2 (`tiny_dir`), a GPT-2 over a ~20-token character BPE small enough to
enumerate every prompt, and a hand-built one-layer model with two latents that can fire together only
through attention to the previous token (tests/search_fixtures.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import search_fixtures as fx
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.sae import activations, pre_activations
from epo_tui.engine.reporting import elite_reports
from epo_tui.engine.search import Search, gradients, propose


def with_search(config, **changes):
    return replace(config, search=replace(config.search, **changes))


def with_feature(config, **changes):
    return replace(config, feature=replace(config.feature, **changes))


def fitness(search: Search, objective, xent) -> np.ndarray:
    """f_k for every elite k (elite k's own objective and xent): the number selection maximizes."""
    return np.asarray(objective) - search.xent_weights_K * np.asarray(xent)


def best_held(search: Search, state) -> np.ndarray:
    """For every k, the best f_k that any elite holds (max over j of f_k(elite j))."""
    f_KxJ = state.objective_K[None, :] - search.xent_weights_K[:, None] * state.xent_K[None, :]
    return f_KxJ.max(-1)


def retokenizes(tokenizer, ids) -> bool:
    """Independently of Search.is_valid: decode, encode, same ids."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def spy_on_evaluate(search: Search) -> list:
    """Records every (children, objective, act, xent) that `search.evaluate_children` returns from now on."""
    calls = []
    original = search.evaluate_children

    def recorded(children_BxN, state, parents, scored=None):
        out = original(children_BxN, state, parents, scored)
        calls.append((np.array(children_BxN), *(np.array(o) for o in out)))
        return out

    search.evaluate_children = recorded
    return calls


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def char_setup(tmp_path_factory) -> tuple[Path, Path]:
    """The character-BPE GPT-2 and an SAE on its blocks.1 residual, with planted latents (fx.PLANTED)."""
    return fx.write_char_setup(tmp_path_factory.mktemp("char"))


@pytest.fixture(scope="module")
def char_pair(char_setup):
    return load_model_with_sae(fx.make_config(*char_setup))


@pytest.fixture(scope="module")
def two_feature(tmp_path_factory):
    model_dir, sae_dir, tok_a, tok_b = fx.write_two_feature_model(tmp_path_factory.mktemp("two"))
    pair = load_model_with_sae(fx.make_config(model_dir, sae_dir))
    return model_dir, sae_dir, tok_a, tok_b, pair


# ----------------------------------------------------------------------------------------------
# 1. Brute force: the search finds the best prompt of all


@pytest.mark.parametrize(("n_tokens", "elites", "features"), [(3, 2, (fx.PLANTED[3], 0, 5)),
                                                              (2, 1, (fx.PLANTED[2], 1))])
def test_search_reaches_the_brute_force_optimum(char_setup, char_pair, n_tokens, elites, features):
    base = fx.make_config(*char_setup, elites=elites, candidates=64, prompt_tokens=n_tokens,
                          penalty_min=fx.PLANTED_PENALTY, penalty_max=3.0,
                          penalty_scale="none")  # the planted penalty is in the SAE's raw units
    tokenizer = char_pair.model.tokenizer
    every, _ = fx.all_prompts(tokenizer, n_tokens, char_pair.model.special_token_ids())
    assert len(every) == 18**n_tokens and char_pair.model.vocab_size == len(tokenizer) + fx.EXTRA_ROWS
    valid = np.array([retokenizes(tokenizer, p) for p in every])
    assert 0.5 < valid.mean() < 1  # the re-tokenization rule removes some prompts

    for feature in features:
        search = Search(char_pair, with_feature(base, index=feature))
        assert search.lambdas_K[0] == pytest.approx(fx.PLANTED_PENALTY)
        objective, _, xent = search.evaluate(every)
        f_KxB = objective - search.xent_weights_K[:, None] * xent
        best_K = f_KxB[:, valid].max(-1)
        if feature == fx.PLANTED[n_tokens]:  # here the rule changes the answer: an invalid prompt is better
            assert f_KxB[0].max() > best_K[0] + 0.1
        state = search.initial_state()
        assert (fitness(search, state.objective_K, state.xent_K) < best_K - 1e-3).any(), "already optimal"
        for _ in range(60):
            state, _ = search.step(state)
        reached = best_held(search, state)  # each lambda's best prompt is held, by its elite or an earlier one
        np.testing.assert_allclose(reached, best_K, atol=1e-5, rtol=0,
                                   err_msg=f"feature {feature}: elites {state.tokens_KxN.tolist()}")
        assert all(retokenizes(tokenizer, row) for row in state.tokens_KxN)


# ----------------------------------------------------------------------------------------------
# 2. Selection: elite k takes the best valid f_k that no earlier elite took, so the elites are distinct
#    and each lambda's best prompt so far is always held by some elite


def expected_selection(weights_K, pool_tokens, pool_obj, pool_xent, valid) -> list[int]:
    """The rule, written out independently: in order of k, the pool's best valid f_k whose tokens no
    earlier pick holds; the best valid one only when every valid prompt is taken."""
    picks, taken = [], []
    for weight in weights_K:
        f = pool_obj - weight * pool_xent
        order = [i for i in np.argsort(-f, kind="stable") if valid[i]]
        fresh = [i for i in order if not any((pool_tokens[i] == pool_tokens[j]).all() for j in taken)]
        picks.append(fresh[0] if fresh else order[0])
        taken.append(picks[-1])
    return picks


def test_elites_are_distinct_and_each_penalty_keeps_its_best_prompt(tiny_config, tiny_pair):
    search = Search(tiny_pair, tiny_config)
    tokenizer = tiny_pair.model.tokenizer
    K = tiny_config.search.elites
    state = search.initial_state()
    state.tokens_KxN[1:] = state.tokens_KxN[0]  # start from copies: selection must spread them out
    state.objective_K[1:], state.act_K[1:], state.xent_K[1:] = (a[0] for a in
                                                                 (state.objective_K, state.act_K, state.xent_K))
    calls = spy_on_evaluate(search)
    improved = 0
    invalid_children = 0
    for _ in range(30):
        before = state
        state, _ = search.step(before)
        children, objective, act, xent = calls[-1]
        assert children.shape == (K * tiny_config.search.candidates, tiny_config.search.prompt_tokens)
        valid = np.array([True] * K + [retokenizes(tokenizer, c) for c in children])
        invalid_children += (~valid[K:]).sum()
        pool_tokens = np.concatenate([before.tokens_KxN, children])
        pool_obj = np.concatenate([before.objective_K, objective])
        pool_xent = np.concatenate([before.xent_K, xent])
        picks = expected_selection(search.xent_weights_K, pool_tokens, pool_obj, pool_xent, valid)
        np.testing.assert_array_equal(state.tokens_KxN, pool_tokens[picks])
        np.testing.assert_allclose(state.objective_K, pool_obj[picks], rtol=0, atol=0)
        distinct_valid = len({pool_tokens[i].tobytes() for i in np.flatnonzero(valid)})
        assert len({row.tobytes() for row in state.tokens_KxN}) == min(K, distinct_valid)
        # no lambda loses its best prompt: the pool's best f_k is held by some elite, so it never falls
        f_pool = pool_obj[None, valid] - search.xent_weights_K[:, None] * pool_xent[None, valid]
        np.testing.assert_allclose(best_held(search, state), f_pool.max(-1), rtol=0, atol=1e-6)
        assert (best_held(search, state) >= best_held(search, before) - 1e-6).all()
        improved += (best_held(search, state) > best_held(search, before)).sum()
        assert state.iteration == before.iteration + 1
    assert improved > 0
    assert invalid_children > 0  # the rule was exercised (a child that does not re-tokenize is never kept)
    assert len({row.tobytes() for row in state.tokens_KxN}) == K
    assert state.best_objective_history and len(state.best_objective_history) == 30


def test_an_elite_shares_a_prompt_only_when_every_valid_prompt_is_taken(tiny_config, tiny_pair):
    search = Search(tiny_pair, tiny_config)
    state = search.initial_state()
    K, N = state.tokens_KxN.shape
    children = np.repeat(state.tokens_KxN[:1], K * tiny_config.search.candidates, axis=0)  # all copies of elite 0
    state.tokens_KxN[:] = state.tokens_KxN[0]
    same = (np.full(K, state.objective_K[0]), np.full(K, state.act_K[0]), np.full(K, state.xent_K[0]))
    state.objective_K, state.act_K, state.xent_K = same
    B = len(children)
    after = search._select(state, children, np.full(B, same[0][0]), np.full(B, same[1][0]), np.full(B, same[2][0]),
                           state.scored)
    np.testing.assert_array_equal(after.tokens_KxN, state.tokens_KxN)  # one prompt in the pool: all hold it


# ----------------------------------------------------------------------------------------------
# 3. Reported numbers equal the plain forward pass over the whole prompt


@pytest.fixture(scope="module")
def random_prompts(tiny_config, tiny_pair):
    rng = np.random.default_rng(0)
    return rng.integers(1, tiny_pair.model.vocab_size, size=(37, tiny_config.search.prompt_tokens)).astype(np.int32)


@pytest.fixture(scope="module")
def sometimes_off_feature(tiny_pair, random_prompts):
    """A latent that is on for some random prompts at the last position and off for others."""
    full = np.concatenate([np.zeros((len(random_prompts), 1), np.int32), random_prompts], axis=1)
    _, sae_in = fx.full_forward(tiny_pair, full)
    on_BxS = np.asarray(activations(tiny_pair.sae, sae_in))[:, -1] > 0
    return int(np.argmax(np.minimum(on_BxS.mean(0), 1 - on_BxS.mean(0))))


@pytest.mark.parametrize("prefix", ["", "The quick brown fox"])
def test_reported_act_and_xent_match_the_plain_forward_pass(tiny_config, tiny_pair, prefix, random_prompts,
                                                            sometimes_off_feature):
    config = with_feature(with_search(tiny_config, prefix=prefix), index=sometimes_off_feature)
    search = Search(tiny_pair, config)
    assert len(search.prefix_ids) == (1 if not prefix else 1 + len(tiny_pair.model.tokenizer(prefix)["input_ids"]))
    state = search.initial_state()
    for _ in range(3):
        state, _ = search.step(state)
    objective, act, xent, full, acts_KxL, _ = fx.independent_numbers(tiny_pair, search, state.tokens_KxN)
    np.testing.assert_allclose(state.act_K, act, atol=1e-4, rtol=0)
    np.testing.assert_allclose(state.objective_K, objective, atol=1e-4, rtol=0)
    np.testing.assert_allclose(state.xent_K, xent, atol=1e-4, rtol=0)

    # the frontier's numbers too (children evaluated in batches of K*C)
    f_obj, f_act, f_xent, *_ = fx.independent_numbers(tiny_pair, search, state.frontier.tokens)
    np.testing.assert_allclose(state.frontier.act, f_act, atol=1e-4, rtol=0)
    np.testing.assert_allclose(state.frontier.objective, f_obj, atol=1e-4, rtol=0)
    np.testing.assert_allclose(state.frontier.xent, f_xent, atol=1e-4, rtol=0)

    # and any batch: random prompts, where the latent is off for some (reported 0, objective < 0)
    r_obj, r_act, r_xent = search.evaluate(random_prompts)
    e_obj, e_act, e_xent, *_ = fx.independent_numbers(tiny_pair, search, random_prompts)
    assert ((e_obj < 0) & (e_act == 0)).any() and (e_act > 0).any()
    np.testing.assert_allclose(r_act, e_act, atol=1e-4, rtol=0)
    np.testing.assert_allclose(r_obj, e_obj, atol=1e-4, rtol=0)
    np.testing.assert_allclose(r_xent, e_xent, atol=1e-4, rtol=0)

    reports = elite_reports(search, state)
    for k, report in enumerate(reports):
        assert report.token_ids == full[k].tolist()
        assert report.prompt_start == len(search.prefix_ids)
        np.testing.assert_allclose(report.activations, acts_KxL[k], atol=1e-4, rtol=0)
        assert report.activations[-1] == pytest.approx(report.act, abs=1e-4)
        assert report.act == pytest.approx(float(state.act_K[k]))
        assert report.penalty == pytest.approx(float(search.lambdas_K[k]))


def test_gradients_and_next_token_logits_match_the_plain_forward_pass(tiny_config, tiny_pair):
    """d f_k / d one-hot by jax.grad through the whole prompt (no prefix cache), and logits[:, j]
    predicting optimized position j."""
    config = with_search(tiny_config, prefix="The quick brown fox")
    search = Search(tiny_pair, config)
    state = search.initial_state()
    tokens = state.tokens_KxN
    grads, parents = gradients(search.params, search.sae, search.arrays, search.prefix, jnp.asarray(tokens),
                               jnp.asarray(search.lambdas_K), st=search.st)
    next_logits = parents.next_logits_KxNxV
    _, _, _, full, _, logits = fx.independent_numbers(tiny_pair, search, tokens)
    P, N = len(search.prefix_ids), tokens.shape[1]
    np.testing.assert_allclose(np.asarray(next_logits), logits[:, P - 1:P + N - 1], atol=1e-4, rtol=0)

    V = tiny_pair.model.vocab_size
    feature = config.feature.index

    def f_of(onehot_NxV, k):
        whole = jnp.concatenate([jax.nn.one_hot(full[k, :P], V), onehot_NxV])[None]
        out_logits, acts = tiny_pair.model.forward(whole, hooks=(tiny_pair.sae.hook_name,),
                                                   center_writes=tiny_pair.center_writes)
        pre = pre_activations(tiny_pair.sae, acts[tiny_pair.sae.hook_name][0, -1])[feature]
        logprobs = jax.nn.log_softmax(out_logits[0, P - 1:P + N - 1], axis=-1)
        return pre - search.lambdas_K[k] * (-(onehot_NxV * logprobs).sum(-1).mean())

    for k in range(len(tokens)):
        expected = np.asarray(jax.grad(f_of)(jax.nn.one_hot(tokens[k], V), k))
        assert np.abs(expected).max() > 1e-2
        np.testing.assert_allclose(np.asarray(grads[k]), expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# 4. Special, banned and padding tokens are never proposed; every prompt kept re-tokenizes


def test_special_banned_and_padding_tokens_are_never_proposed(char_setup, char_pair):
    config = fx.make_config(*char_setup, elites=2, candidates=64, prompt_tokens=3,
                            penalty_min=fx.PLANTED_PENALTY, penalty_max=3.0, banned_tokens=("cd",))
    search = Search(char_pair, config)
    tokenizer = char_pair.model.tokenizer
    model = char_pair.model
    banned_id = tokenizer("cd", add_special_tokens=False)["input_ids"][0]
    padding = list(range(len(tokenizer), model.vocab_size))
    never = sorted({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                    *tokenizer.all_special_ids, banned_id, *padding})
    assert len(never) == 3 + 1 + fx.EXTRA_ROWS  # BOS=EOS=unk, pad, <sep>; "cd"; padding rows

    K, N, V = 2, 3, model.vocab_size
    tokens = jnp.asarray([[3, 4, 5], [6, 7, 8]], jnp.int32)
    # gradients and logits that strongly favour exactly the forbidden tokens
    favour = np.zeros((K, N, V), np.float32)
    favour[..., never] = 100.0
    favour = jnp.asarray(favour)
    for st in (search.st, replace(search.st, topk=3, unmasked_top=3)):  # small top-k: masking must come first
        for seed in range(16):  # 2048 children per variant
            children = np.asarray(propose(jax.random.key(seed), tokens, favour, favour, search.banned_V, st=st))
            assert children.shape == (K, config.search.candidates, N)
            assert not np.isin(children, never).any(), f"proposed {np.unique(children[np.isin(children, never)])}"

    # a whole run: elites and frontier are free of them and re-tokenize to their own ids
    state = search.initial_state()
    calls = spy_on_evaluate(search)
    for _ in range(25):
        state, _ = search.step(state)
    proposed = np.concatenate([c[0] for c in calls])
    assert not np.isin(proposed, never).any()
    assert not all(retokenizes(tokenizer, c) for c in proposed)  # invalid children do come up...
    kept = np.concatenate([state.tokens_KxN, state.frontier.tokens])
    assert len(state.frontier) >= 2
    assert not np.isin(kept, never).any()
    assert all(retokenizes(tokenizer, row) for row in kept)  # ...and none is ever kept


# ----------------------------------------------------------------------------------------------
# 5. The proposal distribution


K5, C5, N5 = 2, 4096, 6


def _propose_stats_inputs(V: int, seed: int = 0):
    """Parents of distinct ids (banned, so any resampled position visibly changes) and random
    gradients and logits."""
    rng = np.random.default_rng(seed)
    parents = np.array([np.arange(10, 10 + N5), np.arange(20, 20 + N5)], np.int32)
    banned = np.zeros(V, bool)
    banned[0] = True
    banned[parents.ravel()] = True
    grads = rng.normal(size=(K5, N5, V)).astype(np.float32)
    logits = rng.normal(size=(K5, N5, V)).astype(np.float32) * 2
    return parents, banned, grads, logits


def _run_propose(st, parents, grads, logits, banned, seed=0):
    return np.asarray(propose(jax.random.key(seed), jnp.asarray(parents), jnp.asarray(grads), jnp.asarray(logits),
                              jnp.asarray(banned), st=st))


def _within(observed, expected, se, z=4.5):
    assert abs(observed - expected) <= z * se, f"observed {observed:.4f}, expected {expected:.4f} +- {z} * {se:.4f}"


@pytest.fixture(scope="module")
def stats_statics(tiny_config, tiny_pair):
    search = Search(tiny_pair, tiny_config)
    return replace(search.st, elites=K5, candidates=C5, prompt_tokens=N5), tiny_pair.model.vocab_size


def test_resampled_positions_per_child(stats_statics):
    base, V = stats_statics
    parents, banned, grads, logits = _propose_stats_inputs(V)
    st = replace(base, swap=0.0, extra_resample=1.5)
    children = _run_propose(st, parents, grads, logits, banned)
    changed = children != parents[:, None]
    assert not np.isin(children[changed], parents).any()
    counts = changed.sum(-1).ravel()
    p = 1.5 / N5
    mean, var = 1 + (N5 - 1) * p, (N5 - 1) * p * (1 - p)
    _within(counts.mean(), mean, np.sqrt(var / counts.size))
    assert counts.min() == 1  # always at least the uniformly chosen one
    # each position: chosen first with 1/N, else resampled with p
    per_position = changed.reshape(-1, N5).mean(0)
    q = 1 / N5 + (1 - 1 / N5) * p
    for j in range(N5):
        _within(per_position[j], q, np.sqrt(q * (1 - q) / counts.size))


def _swap_sample(stats_statics):
    """Children that resample exactly one position (to a non-parent id), 10% of them also swapping;
    and which positions each swap involved."""
    base, V = stats_statics
    parents, banned, grads, logits = _propose_stats_inputs(V)
    st = replace(base, swap=0.1, extra_resample=0.0)
    children = _run_propose(st, parents, grads, logits, banned).reshape(K5, C5, N5)
    full_parents = np.broadcast_to(parents[:, None], children.shape)
    # a swap moves a parent id to another position (also when it hits the resampled position)
    holds_other = np.isin(children, parents) & (children != full_parents)
    moved_away = np.array([[[p in row and row[j] != p for j, p in enumerate(parents[k])] for row in children[k]]
                           for k in range(K5)])
    return parents, children, holds_other.any(-1), holds_other | moved_away


def test_swap_fraction(stats_statics):
    parents, children, swapped_KxC, _ = _swap_sample(stats_statics)
    swapped = swapped_KxC.ravel()
    _within(swapped.mean(), 0.1, np.sqrt(0.09 / swapped.size))
    assert ((children != parents[:, None]).sum(-1)[~swapped_KxC] == 1).all()  # extra_resample = 0: one position
    moved = swapped_KxC
    # a swapped child is its parent with one position resampled and two positions exchanged
    for k, c in zip(*np.nonzero(moved)):
        child = children[k, c]
        assert (~np.isin(child, parents[k])).sum() == 1  # one new id
        assert len(set(child.tolist())) == N5  # nothing duplicated
        assert (child != parents[k]).sum() in (2, 3)  # the swap hit the resampled position, or not


def test_swapped_pairs_are_uniform_over_positions(stats_statics):
    _, _, swapped_KxC, involved_KxCxN = _swap_sample(stats_statics)
    involved = involved_KxCxN[swapped_KxC]  # swapped children x positions
    assert (involved.sum(-1) == 2).all()
    per_position = involved.mean(0)
    for j in range(N5):  # a uniform pair of distinct positions contains j with probability 2 / N
        _within(per_position[j], 2 / N5, np.sqrt((2 / N5) * (1 - 2 / N5) / len(involved)))


def test_gradient_mask_and_its_skipping(stats_statics):
    base, V = stats_statics
    parents, banned, grads, logits = _propose_stats_inputs(V)
    topk, top_m = 8, 5
    # make the gradient's top-k and the logits' top-m disjoint, so the two sources are told apart
    by_logit = np.argsort(-np.where(banned, -np.inf, logits), axis=-1)[..., :top_m]
    np.put_along_axis(grads, by_logit, -10.0, axis=-1)
    by_grad = np.argsort(-np.where(banned, -np.inf, grads), axis=-1)[..., :topk]
    assert not (by_grad[..., :, None] == by_logit[..., None, :]).any()

    def sources(skip):
        st = replace(base, swap=0.0, topk=topk, unmasked_top=top_m, skip_gradient_mask=skip)
        children = _run_propose(st, parents, grads, logits, banned)
        changed = children != parents[:, None]
        k_idx, c_idx, n_idx = np.nonzero(changed)
        new = children[k_idx, c_idx, n_idx]
        in_grad = (by_grad[k_idx, n_idx] == new[:, None]).any(-1)
        in_logit = (by_logit[k_idx, n_idx] == new[:, None]).any(-1)
        return children, changed, in_grad, in_logit, (k_idx, c_idx)

    _, _, in_grad, in_logit, _ = sources(0.0)
    assert in_grad.all() and not in_logit.any()  # every new token is in the top-k by gradient
    _, _, in_grad, in_logit, _ = sources(1.0)
    # every new token is among the likeliest top_m of its own position (next_logits[:, j] predicts
    # position j: the caller has already shifted them; the top-m sets differ from position to position)
    assert in_logit.all() and not in_grad.any()
    _, changed, in_grad, in_logit, (k_idx, c_idx) = sources(0.2)
    assert (in_grad | in_logit).all()
    child = k_idx * C5 + c_idx
    unmasked_child = np.zeros(K5 * C5, bool)
    unmasked_child[child[in_logit]] = True
    masked_child = np.zeros(K5 * C5, bool)
    masked_child[child[in_grad]] = True
    assert not (unmasked_child & masked_child).any()  # the mask is skipped for a whole child
    _within(unmasked_child.mean(), 0.2, np.sqrt(0.16 / unmasked_child.size))


@pytest.mark.parametrize("children, skip", [(3, 0.2), (5, 0.5), (7, 0.05)])
def test_each_child_skips_the_mask_with_the_exact_probability_for_any_children_count(stats_statics, children, skip):
    """The unmasked draw runs for ceil(p C) slots per elite; the marginal per child must stay p."""
    base, V = stats_statics
    parents, banned, grads, logits = _propose_stats_inputs(V)
    by_logit = np.argsort(-np.where(banned, -np.inf, logits), axis=-1)[..., :2]
    np.put_along_axis(grads, by_logit, -10.0, axis=-1)  # the two sources disjoint again
    st = replace(base, swap=0.0, extra_resample=float(N5), topk=8, unmasked_top=2, candidates=children,
                 skip_gradient_mask=skip)
    draws = 3000
    skipped = 0
    for seed in range(draws // children + 1):
        out = _run_propose(st, parents, grads, logits, banned, seed=seed)
        new_from_logits = (out[..., None] == by_logit[:, None]).any(-1)  # K x C x N
        skipped += new_from_logits.all(-1).sum()  # every position resampled: a skipping child is all top-m
    total = (draws // children + 1) * children * K5
    _within(skipped / total, skip, np.sqrt(skip * (1 - skip) / total))



def _expected_probabilities(logits_V: np.ndarray, t_max: float, t_min: float = 1e-3) -> np.ndarray:
    """E over T ~ U(0, t_max) of softmax(logits / T) (numerically integrated)."""

    def at(t):
        z = logits_V / t
        z = np.exp(z - z.max())
        return z / z.sum()

    grid = np.linspace(t_min, t_max, 20001)
    values = np.array([at(t) for t in grid])
    return np.trapezoid(values, x=grid, axis=0) / (t_max - t_min)


def test_sampling_temperature(stats_statics):
    base, V = stats_statics
    parents, banned, grads, _ = _propose_stats_inputs(V)
    # the same logits at every position: a clear argmax, a runner-up, and a long tail
    rng = np.random.default_rng(1)
    row = np.where(banned, -np.inf, rng.normal(size=V) * 1.0)
    order = np.argsort(-row)
    row[order[0]] += 2.0
    row[order[1]] += 1.0
    logits = np.broadcast_to(np.where(banned, 0.0, row), (K5, N5, V)).astype(np.float32)
    finite = np.where(banned, -np.inf, logits[0, 0]).astype(np.float64)
    top = np.argsort(-finite)[:2]

    share_of_argmax = {}
    for t_max in (2.0, 0.25):
        st = replace(base, swap=0.0, extra_resample=0.0, skip_gradient_mask=1.0, unmasked_top=V,
                     temperature_max=t_max)
        children = _run_propose(st, parents, grads, logits, banned, seed=3)
        changed = children != parents[:, None]
        assert (changed.sum(-1) == 1).all()
        new = children[changed]  # one independent draw per child
        expected = _expected_probabilities(finite, t_max)
        for token in top:
            p = expected[token]
            _within((new == token).mean(), p, np.sqrt(p * (1 - p) / new.size))
        share_of_argmax[t_max] = (new == top[0]).mean()
    assert share_of_argmax[0.25] > share_of_argmax[2.0] + 0.2


# ----------------------------------------------------------------------------------------------
# 6. Determinism


def test_same_seed_same_run_other_seed_other_run(tiny_config, tiny_pair):
    def run(seed):
        search = Search(tiny_pair, with_search(tiny_config, seed=seed))
        state = search.initial_state()
        for _ in range(8):
            state, _ = search.step(state)
        return state

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.tokens_KxN, b.tokens_KxN)
    for name in ("objective_K", "act_K", "xent_K"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("tokens", "xent", "objective", "act"):
        np.testing.assert_array_equal(getattr(a.frontier, name), getattr(b.frontier, name))
    assert a.best_objective_history == b.best_objective_history
    assert not np.array_equal(a.tokens_KxN, c.tokens_KxN)
    assert a.frontier.tokens.shape != c.frontier.tokens.shape or not np.array_equal(a.frontier.tokens,
                                                                                     c.frontier.tokens)


# ----------------------------------------------------------------------------------------------
# 7. Several features at once (lp): both latents at one position, which no single-latent run reaches


def test_lp_raises_two_latents_at_one_position(two_feature):
    model_dir, sae_dir, tok_a, tok_b, pair = two_feature
    # the planted penalties are in the latents' raw units
    common = dict(elites=2, candidates=32, prompt_tokens=4, penalty_min=0.02, penalty_max=0.05, penalty_scale="none")

    def run(feature):
        config = fx.make_config(model_dir, sae_dir, feature, **common)
        search = Search(pair, config)
        state = search.initial_state()
        for _ in range(20):
            state, _ = search.step(state)
        prefix = np.asarray(search.prefix_ids)
        full = np.concatenate([np.broadcast_to(prefix, (len(state.tokens_KxN), len(prefix))), state.tokens_KxN], 1)
        _, sae_in = fx.full_forward(pair, full)
        acts_KxLx2 = np.asarray(activations(pair.sae, sae_in))[..., :2]
        return search, state, acts_KxLx2

    _, state_a, acts_a = run(0)  # "the current token is a"
    _, state_b, acts_b = run(1)  # "the previous token is b"
    search_ab, state_ab, acts_ab = run((0, 1))  # both, combined by lp

    # each single run fires its own latent at the last position, and leaves the other one off there
    assert (acts_a[:, -1, 0] > 0.4).all() and (acts_a[:, -1, 1] == 0).all()
    assert (acts_b[:, -1, 1] > 0.4).all() and (acts_b[:, -1, 0] == 0).all()
    assert (state_a.tokens_KxN[:, -1] == tok_a).all() and (state_b.tokens_KxN[:, -2] == tok_b).all()
    # the lp run fires both at the same (last) position: "... b a"
    assert (state_ab.tokens_KxN[:, -2:] == [tok_b, tok_a]).all()
    assert (acts_ab[:, -1, 0] > acts_b[:, -1, 0].max() + 0.4).all()
    assert (acts_ab[:, -1, 1] > acts_a[:, -1, 1].max() + 0.4).all()
    # it pays for it in fluency: the single runs end in the model's favourite, a repeat
    assert state_ab.xent_K.min() > max(state_a.xent_K.max(), state_b.xent_K.max())

    # what the lp run reports: the lp combination of the two true activations, per feature too
    reports = elite_reports(search_ab, state_ab)
    for k, report in enumerate(reports):
        np.testing.assert_allclose(report.feature_activations["0"], acts_ab[k, :, 0], atol=1e-5)
        np.testing.assert_allclose(report.feature_activations["1"], acts_ab[k, :, 1], atol=1e-5)
        a = acts_ab[k, -1]
        expected = np.mean(np.maximum(a + 4.0, 1e-6) ** 0.1) ** 10 - 4.0
        assert report.act == pytest.approx(expected, abs=1e-4)
        assert report.activations[-1] == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# 8. No recompilation after the first iteration, nor for another feature of the same SAE


class CompileCounter:
    """Names of the functions XLA compiles while active (jax.monitoring's backend-compile event)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.compiled: list[str] = []

    def __call__(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.compiled.append(str(kwargs.get("fun_name")))

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_no_recompilation_across_iterations_and_features(tiny_config, tiny_pair):
    with CompileCounter() as check:  # the counter sees a compilation
        jax.jit(lambda x: x * 3.0 + 1.0)(np.arange(7.0))
    assert len(check.compiled) == 1, check.compiled

    config = tiny_config
    search = Search(tiny_pair, config)  # the first iteration may compile (unless another test did)
    state = search.initial_state()
    state, _ = search.step(state)
    elite_reports(search, state)

    with CompileCounter() as later:
        for _ in range(4):  # iterations 2..5
            state, _ = search.step(state)
    assert later.compiled == [], f"recompiled during iterations 2..5: {later.compiled}"

    other = (tiny_config.feature.index + 1) % tiny_pair.sae.d_sae
    with CompileCounter() as switched:
        search2 = Search(tiny_pair, with_feature(config, index=other))
        state2 = search2.initial_state()
        for _ in range(3):
            state2, _ = search2.step(state2)
        elite_reports(search2, state2)
    assert switched.compiled == [], f"compiled for another feature: {switched.compiled}"
    assert not np.array_equal(np.asarray(search.arrays.indices_F), np.asarray(search2.arrays.indices_F))


def test_a_warmed_up_search_compiles_nothing_while_it_runs(tiny_config, tiny_pair):
    """`Search.warm_up` (which `bench --quality` runs before any budget starts) compiles every step an
    iteration may run, every suffix bucket included, and leaves the search's results as they were."""
    # shapes no other test uses, so that nothing is compiled yet
    config = replace(tiny_config, search=replace(tiny_config.search, candidates=5, prompt_tokens=7))
    warmed = Search(tiny_pair, config)
    with CompileCounter() as warming:
        warmed.warm_up()
    assert warming.compiled, "warm_up compiled nothing: the test would prove nothing"
    with CompileCounter() as running:
        state = warmed.initial_state()
        for _ in range(6):
            state, _ = warmed.step(state)
    assert running.compiled == [], f"compiled after warm_up: {running.compiled}"

    plain = Search(tiny_pair, config)
    same = plain.initial_state()
    for _ in range(6):
        same, _ = plain.step(same)
    np.testing.assert_array_equal(state.tokens_KxN, same.tokens_KxN)
    np.testing.assert_array_equal(state.objective_K, same.objective_K)

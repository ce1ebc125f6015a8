"""FLOPs of one EPO iteration, counted two ways: XLA's cost analysis of the compiled steps, and an analytic
count from the model's shapes; and two structural checks built on them (the fixed prefix is computed once,
the gradient pass computes no weight gradients)."""

from __future__ import annotations

import math

PREFIX_CHECK_EXTRA = 32  # prefix positions added to see what the evaluation's cost grows by


def _xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per module
        return float(sum(a.get("flops", 0.0) for a in analysis))
    return float(analysis.get("flops", 0.0)) if analysis else 0.0


def _one_chunk_scorer(st):
    import jax

    from epo_tui.engine import evaluation

    return jax.jit(lambda params, sae, arrays, prefix, tokens: evaluation.score(
        params, sae, arrays, prefix, tokens, st)[:3])


def xla_flops(search, state, calls: dict[int, int], children: int, iterations: int) -> dict:
    """FLOPs per iteration by XLA's cost analysis of the compiled steps.

    The evaluation's count is what it ran: per bucket start (engine/evaluation.py), the calls made over
    `iterations` iterations times one call's count, per iteration. `evaluation_per_child` divides by the
    `children` proposed, and `evaluation_vs_full_forward` compares that with running every child's
    every position (one full call's count per prompt in it).
    """
    import jax.numpy as jnp

    from epo_tui.engine import search as search_module

    st = search.st
    tokens, key = jnp.asarray(state.tokens_KxN), _key_of(state)
    weights = jnp.asarray(search.xent_weights_K)
    grads_compiled = search_module.gradients.lower(search.params, search.sae, search.arrays, search.prefix, tokens,
                                                   weights, st=st).compile()
    grads, parents = search_module.gradients(search.params, search.sae, search.arrays, search.prefix, tokens,
                                             weights, st=st)
    propose_compiled = search_module.propose.lower(key, tokens, grads, parents.next_logits_KxNxV, search.banned_V,
                                                   st=st).compile()
    scorer = search.scorer
    per_call = {start: _xla_flops(scorer.compiled_call(start, parents)) for start in sorted(set(calls) | {0})}
    evaluation = sum(n * per_call[start] for start, n in calls.items()) / max(iterations, 1)
    full_per_child = per_call[0] / scorer.chunk
    per_child = evaluation * max(iterations, 1) / max(children, 1)
    out = {
        "gradients": _xla_flops(grads_compiled),
        "proposals": _xla_flops(propose_compiled),
        "evaluation": evaluation,
        "evaluation_per_call": {str(k): v for k, v in per_call.items()},
        "evaluation_calls": {str(k): v for k, v in sorted(calls.items())},
        "evaluation_per_child": per_child,
        "full_forward_per_child": full_per_child,
        "evaluation_vs_full_forward": per_child / full_per_child if full_per_child else float("nan"),
        "evaluation_chunk": scorer.chunk,
        "devices": search.mesh.size,
    }
    out["total"] = out["gradients"] + out["proposals"] + out["evaluation"]
    return out


def _key_of(state):
    import jax
    import jax.numpy as jnp

    return jax.random.wrap_key_data(jnp.asarray(state.key))


def _matmul_params_per_layer(block: dict) -> int:
    return sum(int(math.prod(a.shape)) for a in block.values() if getattr(a, "ndim", 0) >= 2)


def analytic_flops(search, positions_share: float = 1.0) -> dict:
    """FLOPs per iteration counted from the shapes (multiply-adds x 2), as the code computes them:

    forward per row of N optimized tokens after P prefix positions:
      2 N * (matmul weights of all blocks)                       -- the linear layers
      + layers * 2 * 2 N (P + N) * heads * head_dim              -- scores and mixing, full N x (P + N)
      + 2 N D V                                                  -- the unembedding (all N positions)
      + 2 N D * SAE columns                                      -- the target (1 column, all for TopK)
      + 2 N V D for a one-hot input                              -- the gradient pass's embedding
    gradient pass = forward + activation gradients (the same matmuls again, attention twice):
    no weight gradients. `gradients_if_weight_grads` adds them, for comparison. The evaluation runs
    `positions_share` of its children's positions (engine/evaluation.py: suffixes, reused scores);
    `evaluation_if_every_position` is the plain forward of every child.
    """
    st, model, sae = search.st, search.pair.model, search.pair.sae
    cfg = model.cfg
    K, C, N = st.elites, st.candidates, st.prompt_tokens
    P = len(search.prefix_ids)
    D, V = cfg.d_model, cfg.vocab_size
    width = cfg.n_heads * getattr(cfg, "head_dim", D // cfg.n_heads)
    blocks = model.params["blocks"]
    linear = 2 * N * sum(_matmul_params_per_layer(b) for b in blocks)
    attention = len(blocks) * 2 * 2 * N * (P + N) * width
    unembed = 2 * N * D * V
    sae_columns = sae.d_sae if (st.target.kind == "sae" and sae.ranks_latents) else st.target.n_features
    target = 2 * N * D * sae_columns if st.target.kind in ("sae", "direction", "vector") else 0
    onehot = 2 * N * V * D
    forward_ids = linear + attention + unembed + target
    forward_onehot = forward_ids + onehot
    backward = linear + 2 * attention + unembed + target + onehot
    weight_grads = linear + unembed + onehot
    out = {
        "gradients": K * (forward_onehot + backward),
        "gradients_if_weight_grads": K * (forward_onehot + backward + weight_grads),
        "proposals": 0.0,
        "evaluation": K * C * forward_ids * positions_share,
        "evaluation_if_every_position": K * C * forward_ids,
        "evaluation_positions_share": positions_share,
        "per_row": {"linear": linear, "attention": attention, "unembedding": unembed, "target": target,
                    "onehot_embedding": onehot},
        "gradient_rows": K,
        "evaluation_rows": K * C,
        "model_params": int(sum(int(math.prod(a.shape)) for a in _leaves(model.params))),
    }
    out["total"] = out["gradients"] + out["evaluation"]
    return out


def _leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------------------------
# Structural checks


def prefix_check(search) -> dict:
    """The evaluation attends to the fixed prefix's cached keys/values instead of recomputing it.

    One evaluation chunk is costed (XLA, lowered) after the real prefix and after a prefix longer by
    PREFIX_CHECK_EXTRA positions. Recomputing the prefix would add about extra x (the cost of one
    token) per row; attending to cached keys/values adds only the attention terms.
    """
    import jax.numpy as jnp
    import numpy as np

    from epo_tui.engine import evaluation

    model, st = search.pair.model, search.st
    ids = list(search.prefix_ids)
    extra = min(PREFIX_CHECK_EXTRA, model.cfg.max_positions - len(ids) - st.prompt_tokens)
    if extra <= 0:
        return {"checked": False, "reason": "no room for a longer prefix"}
    filler = int(np.flatnonzero(~np.asarray(search.banned_V))[0])
    longer_ids = ids + [filler] * extra
    logits, _, kv = model.prefill(longer_ids)
    longer = evaluation.Prefix(kv=kv, next_logits_V=logits[0, -1])
    chunk = search.scorer.chunk
    tokens = jnp.zeros((chunk, st.prompt_tokens), jnp.int32) + filler
    scorer = _one_chunk_scorer(st)

    def cost(prefix) -> float:
        analysis = scorer.lower(search.params, search.sae, search.arrays, prefix, tokens).cost_analysis()
        return float(analysis["flops"]) if analysis else float("nan")

    base, grown = cost(search.prefix), cost(longer)
    per_token = base / (chunk * st.prompt_tokens)
    cfg = model.cfg
    width = cfg.n_heads * getattr(cfg, "head_dim", cfg.d_model // cfg.n_heads)
    attention_only = cfg.n_layers * 2 * 2 * st.prompt_tokens * extra * width * chunk
    if_recomputed = chunk * extra * per_token
    added = grown - base
    return {
        "checked": True,
        "prefix_tokens": len(ids),
        "extra_prefix_tokens": extra,
        "added_flops": added,
        "added_if_attention_only": attention_only,
        "added_if_prefix_recomputed": if_recomputed,
        "added_over_recomputed": added / if_recomputed,
        "prefix_computed_once": bool(added < 0.25 * if_recomputed),
    }


def gradient_check(xla: dict, analytic: dict) -> dict:
    """The gradient pass's XLA count against the activation-gradient-only count and the one with
    weight gradients: closer to the first means no weight gradients are computed."""
    measured = xla["gradients"]
    lean, wasteful = analytic["gradients"], analytic["gradients_if_weight_grads"]
    return {
        "xla_flops": measured,
        "analytic_activation_grads_only": lean,
        "analytic_with_weight_grads": wasteful,
        "xla_over_activation_only": measured / lean if lean else float("nan"),
        "no_weight_gradients": bool(abs(measured - lean) < abs(measured - wasteful)),
        # the one-hot embedding matmul, forward and backward: the forward one is a gather's job
        "onehot_embedding_share": 2 * analytic["gradient_rows"] * analytic["per_row"]["onehot_embedding"] / lean
        if lean else float("nan"),
    }

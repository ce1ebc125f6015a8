"""A sparse mixture-of-experts MLP (Qwen 3 MoE's `Qwen3MoeSparseMoeBlock`), evaluated densely.

Each token's router picks its top-k experts by softmax probability (optionally renormalised to sum
to 1); the block's output is the probability-weighted sum of those experts' SiLU-gated MLPs. Here
every expert runs on every token and the unchosen ones get weight 0: exact, with static shapes (no
gather or sort), and shardable over experts like any einsum. The price is FLOPs: 3·D·F·E
multiply-adds per token and MoE layer instead of 3·D·F·k, E/k times the sparse cost (Qwen3-30B-A3B:
128 experts, top 8, so 16x its active-expert MLP, about 29 GMAC per token over its 48 layers). Dense
still wins where it was measured: one such layer (D 2048, F 768, E 128, k 8, bfloat16) on 20,480
tokens took 38 ms on an H200 (656 TFLOP/s), the sorted `jax.lax.ragged_dot` version 306 ms (JAX 0.11).

Shapes: B batch, L positions, D d_model, E experts, F each expert's MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def router_weights(logits_BxLxE: jnp.ndarray, k: int, norm_topk_prob: bool) -> jnp.ndarray:
    """weights_BxLxE: each token's top-k softmax probabilities (renormalised over the k when
    `norm_topk_prob`), 0 for the other experts; softmax in float32, cast to the logits' dtype, as
    Qwen3MoeTopKRouter does."""
    probs_BxLxE = jax.nn.softmax(logits_BxLxE.astype(jnp.float32), axis=-1)
    top_BxLxk, chosen_BxLxk = jax.lax.top_k(probs_BxLxE, k)
    if norm_topk_prob:
        top_BxLxk = top_BxLxk / top_BxLxk.sum(-1, keepdims=True)
    E = logits_BxLxE.shape[-1]
    weights_BxLxE = jnp.einsum("BLk,BLkE->BLE", top_BxLxk, jax.nn.one_hot(chosen_BxLxk, E, dtype=jnp.float32))
    return weights_BxLxE.astype(logits_BxLxE.dtype)


def moe_mlp(block: dict, x_BxLxD: jnp.ndarray, k: int, norm_topk_prob: bool, activation) -> jnp.ndarray:
    """sum_e w_e(x) · down_e(activation(gate_e(x)) * up_e(x)) -> mlp_out_BxLxD.

    Weights: w_router_ExD (the router, `mlp.gate`), w_gate_ExFxD, w_up_ExFxD, w_down_ExDxF. The
    activation runs in float32 and is cast back to x's dtype.
    """
    logits_BxLxE = jnp.einsum("BLD,ED->BLE", x_BxLxD, block["w_router_ExD"])
    weights_BxLxE = router_weights(logits_BxLxE, k, norm_topk_prob)
    gate_BxLxExF = jnp.einsum("BLD,EFD->BLEF", x_BxLxD, block["w_gate_ExFxD"])
    up_BxLxExF = jnp.einsum("BLD,EFD->BLEF", x_BxLxD, block["w_up_ExFxD"])
    hidden_BxLxExF = activation(gate_BxLxExF.astype(jnp.float32)).astype(x_BxLxD.dtype) * up_BxLxExF
    # weighting before the down projection contracts experts and width at once (no BxLxExD tensor)
    weighted_BxLxExF = hidden_BxLxExF * weights_BxLxE[..., None]
    return jnp.einsum("BLEF,EDF->BLD", weighted_BxLxExF, block["w_down_ExDxF"])

"""Prompts sampled from the model itself, token by token against a KV cache: a search's starting elites
are such samples, so they are fluent before the first iteration.

Shapes: K prompts, N tokens after the prefix, V vocabulary, P prefix length, S = P + N cache slots,
G key/value heads, and per-head size in the last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from epo_tui.engine.evaluation import Prefix, Statics
from epo_tui.engine.export_cache import exported_jit
from epo_tui.engine.language_model import apply_model
from epo_tui.engine.models.past import FilledPast, prefix_length


@exported_jit(static_argnames=("st",))
def sample_continuations(params, prefix: Prefix, key, start_KxN, n_start, banned_V, *, st: Statics):
    """Positions n_start.. sampled one by one from the model at temperature 1 (banned tokens never).

    Each step runs only its newest token against a KV cache (`cached_step`), so sampling N tokens costs
    about one forward over them."""
    K, N = start_KxN.shape

    def body(j, carry):
        tokens_KxN, cache, next_logits_KxV = carry
        sampled_K = jax.random.categorical(jax.random.fold_in(key, j), jnp.where(banned_V, -jnp.inf, next_logits_KxV))
        tokens_KxN = jnp.where(j >= n_start, tokens_KxN.at[:, j].set(sampled_K.astype(jnp.int32)), tokens_KxN)
        next_logits_KxV, cache = cached_step(params, cache, jax.lax.dynamic_slice_in_dim(tokens_KxN, j, 1, axis=1),
                                             st=st)
        return tokens_KxN, cache, next_logits_KxV

    first_KxV = jnp.broadcast_to(prefix.next_logits_V, (K,) + prefix.next_logits_V.shape)
    tokens_KxN, _, _ = jax.lax.fori_loop(0, N, body, (start_KxN, empty_cache(prefix, K, N), first_KxV))
    return tokens_KxN


def empty_cache(prefix: Prefix, K: int, N: int) -> FilledPast:
    """A KV cache for K prompts of N tokens after the prefix: the prefix's keys and values, then N empty
    slots per layer (each KxSxGxK, S = P + N)."""
    kv = tuple(tuple(jnp.concatenate([jnp.broadcast_to(t, (K,) + t.shape[1:]),
                                      jnp.zeros((K, N) + t.shape[2:], t.dtype)], axis=1) for t in layer_kv)
               for layer_kv in prefix.kv)
    return FilledPast(kv, jnp.int32(prefix_length(prefix.kv)))


def cached_step(params, cache: FilledPast, newest_Kx1, *, st: Statics) -> tuple[jax.Array, FilledPast]:
    """(the logits_KxV predicting the next token, the cache with the newest token's keys and values added)
    from the newest token (Kx1) alone, at the position after those the cache holds (`cache.length`)."""
    logits_Kx1xV, _, kv = apply_model(params, newest_Kx1, cache, model_type=st.model_type, cfg=st.cfg, hooks=(),
                                      logits=True, center_writes=st.center_writes, keep_kv=True)
    slot = cache.length
    filled = tuple(tuple(jax.lax.dynamic_update_slice_in_dim(slots, new.astype(slots.dtype), slot, axis=1)
                         for slots, new in zip(layer_slots, layer_kv)) for layer_slots, layer_kv in zip(cache.kv, kv))
    return logits_Kx1xV[:, 0], FilledPast(filled, slot + 1)

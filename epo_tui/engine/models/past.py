"""Keys and values of earlier positions that a pass attends to before its own, and the causal mask.

A past is one (k, v) pair per layer, each BxPxGxK (or 1xPxGxK, broadcast over the batch): a fixed
prefix's, or a parent's before its first changed position. A `FilledPast` has room for more positions
than it holds so far: only its first `length` slots (a traced count) are attended to. Sampling with a
KV cache uses it, so that one executable serves every step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class FilledPast(NamedTuple):
    """Per-layer (k, v), each BxSxGxK, of which the first `length` slots hold positions 0..length-1."""

    kv: tuple
    length: jax.Array  # int32 scalar, may be traced


def prefix_length(prefix_kv):
    """The absolute position of a pass's first token: P for per-layer (k, v) shaped 1xPx... (an int),
    a FilledPast's `length` (traced), 0 for none."""
    if prefix_kv is None:
        return 0
    if isinstance(prefix_kv, FilledPast):
        return prefix_kv.length
    return prefix_kv[0][0].shape[1]


def layer_past(prefix_kv, layer: int):
    """Layer `layer`'s past as `attend` takes it: (k, v), or (k, v, length) from a FilledPast."""
    if prefix_kv is None:
        return None
    if isinstance(prefix_kv, FilledPast):
        return (*prefix_kv.kv[layer], prefix_kv.length)
    return prefix_kv[layer]


def filled(past_kv):
    """How many of one layer's past slots hold positions: None when all do."""
    return past_kv[2] if past_kv is not None and len(past_kv) == 3 else None


def with_past(past_kv, k_BxLxNxK: jnp.ndarray, v_BxLxNxK: jnp.ndarray):
    """(k, v) over past + new positions: a fixed prefix's (1xPxNxK) broadcast over the batch, or one past
    per row (BxPxNxK: a parent's keys and values before the first changed position)."""
    if past_kv is None:
        return k_BxLxNxK, v_BxLxNxK
    B = k_BxLxNxK.shape[0]
    past_k, past_v = (jnp.broadcast_to(t, (B,) + t.shape[1:]).astype(k_BxLxNxK.dtype) for t in past_kv[:2])
    return jnp.concatenate([past_k, k_BxLxNxK], axis=1), jnp.concatenate([past_v, v_BxLxNxK], axis=1)


def causal_mask(L: int, S: int, window: int | None = None, filled=None) -> jnp.ndarray:
    """allowed_LxS for L new queries after S - L past slots; with `window`, keys further back than
    window - 1 positions are masked too (sliding attention).

    Every past slot holds a position (query l is at S - L + l), unless `filled` (an int, may be traced)
    says only the first `filled` do: then query l is at filled + l and the other past slots are masked.
    """
    n_past = S - L
    k_S = jnp.arange(S)[None, :]
    if filled is None:
        q_L = jnp.arange(n_past, S)[:, None]
        key_S, held_S = k_S, True
    else:
        q_L = filled + jnp.arange(L)[:, None]
        key_S = jnp.where(k_S < n_past, k_S, filled + k_S - n_past)
        held_S = (k_S >= n_past) | (k_S < filled)
    allowed = held_S & (key_S <= q_L)
    if window is not None:
        allowed &= key_S > q_L - window
    return allowed

"""Pieces every family shares: norms, soft-capping, rotary position embeddings and attention.

Each follows the transformers implementation it replaces (cited per function), including where it
computes in float32 and where it casts back, so float32 matches to rounding and bfloat16 stays close.

Shapes: B batch, L new positions, S key positions (prefix + new), H query heads, G key-value heads,
R query heads per key-value head (H = G * R), K head dim, D d_model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui.engine.models.hooks import HookRecorder
from epo_tui.engine.models.past import causal_mask, filled, layer_past, prefix_length, with_past
from epo_tui.errors import UserError


def rms_norm(x: jnp.ndarray, w: jnp.ndarray, eps: float, offset: float = 0.0,
             gain_in_float32: bool = True) -> jnp.ndarray:
    """x / rms(x) * (offset + w), normalised in float32 and returned in x's dtype.

    Gemma's norms (offset 1) apply the gain in float32 and then cast (`Gemma*RMSNorm`); Llama-style
    norms (offset 0, `gain_in_float32=False`) cast first and then apply the gain (`LlamaRMSNorm`).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt((x32**2).mean(-1, keepdims=True) + eps)
    if gain_in_float32:
        return (normed * (offset + w.astype(jnp.float32))).astype(x.dtype)
    return (offset + w) * normed.astype(x.dtype)


def rms_normalized(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x / rms(x) without the gain: TransformerLens's `ln.hook_normalized` of an RMSNorm."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt((x32**2).mean(-1, keepdims=True) + eps)).astype(x.dtype)


def layer_normalized(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """(x - mean) / std without gain or bias (TransformerLens's `ln.hook_normalized` of a LayerNorm)."""
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    return (centred * jax.lax.rsqrt((centred**2).mean(-1, keepdims=True) + eps)).astype(x.dtype)


def layer_norm(x: jnp.ndarray, g: jnp.ndarray, b: jnp.ndarray, eps: float) -> jnp.ndarray:
    """torch.nn.LayerNorm: normalised in float32, then gain and bias in x's dtype."""
    return layer_normalized(x, eps) * g + b


def decoder_dims(hf) -> dict[str, Any]:
    """The sizes every RMSNorm decoder config (Gemma, Gemma 3, Llama and its kin) names alike, under our
    field names. `head_dim` and `num_key_value_heads` fall back as transformers does when absent."""
    return dict(
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        max_positions=hf.max_position_embeddings,
        rms_norm_eps=hf.rms_norm_eps,
    )


def softcap(x: jnp.ndarray, cap: float | None) -> jnp.ndarray:
    """tanh(x / cap) * cap (Gemma 2/3's attention and final-logit soft-capping); x when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (transformers' modeling_rope_utils; rotate_half layout)


@dataclass(frozen=True)
class Rope:
    """One RoPE: its base, how many leading dims of each head rotate (partial rotary), and its
    frequency scaling as a hashable tuple: ("default",), ("linear", factor) or
    ("llama3", factor, low_freq_factor, high_freq_factor, original_max_positions)."""

    theta: float
    rotary_dim: int
    scaling: tuple = ("default",)

    def inv_freq(self) -> np.ndarray:
        """Frequencies (rotary_dim / 2,), float32, as transformers computes them for this rope type."""
        inv = 1.0 / (self.theta ** (np.arange(0, self.rotary_dim, 2, dtype=np.int64).astype(np.float32)
                                    / self.rotary_dim))
        kind = self.scaling[0]
        if kind == "linear":
            return (inv / self.scaling[1]).astype(np.float32)
        if kind == "llama3":  # _compute_llama3_parameters: long wavelengths slowed, a smooth band between
            factor, low, high, original = self.scaling[1:]
            wavelen = 2 * math.pi / inv
            slowed = np.where(wavelen > original / low, inv / factor, inv)
            smooth = (original / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * slowed / factor + smooth * slowed
            medium = ~(wavelen < original / high) & ~(wavelen > original / low)
            return np.where(medium, smoothed, slowed).astype(np.float32)
        return inv.astype(np.float32)

    def tables(self, L: int, dtype, start=0) -> tuple[jnp.ndarray, jnp.ndarray]:
        """cos_LxR and sin_LxR (R = rotary_dim) for positions start..start+L-1, computed in float32
        and cast to the activations' dtype, as transformers does."""
        positions_L = start + jnp.arange(L, dtype=jnp.float32)  # start may be traced (models/past.py)
        freqs_LxR = jnp.tile(positions_L[:, None] * jnp.asarray(self.inv_freq())[None, :], (1, 2))
        return jnp.cos(freqs_LxR).astype(dtype), jnp.sin(freqs_LxR).astype(dtype)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_from_hf(settings: Mapping[str, Any], rotary_dim: int, family: str) -> Rope:
    """A Rope from one transformers rope dict (`rope_parameters`, or the old `rope_scaling` plus
    `rope_theta`). Raises UserError for a rope type we do not run."""
    kind = settings.get("rope_type", settings.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"{family} with rope_type '{kind}' is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = float(settings.get("rope_theta") or 10000.0)
    if kind == "linear":
        return Rope(theta, rotary_dim, ("linear", float(settings["factor"])))
    if kind == "llama3":
        return Rope(theta, rotary_dim, ("llama3", float(settings["factor"]), float(settings["low_freq_factor"]),
                                        float(settings["high_freq_factor"]),
                                        float(settings["original_max_position_embeddings"])))
    return Rope(theta, rotary_dim)


def hf_rope_settings(hf) -> dict[str, Any]:
    """The config's rope dict: `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`
    (transformers 4 files); one entry per layer type where the config has several."""
    settings = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if settings and all(isinstance(v, Mapping) for v in settings.values()):
        return {layer_type: dict(v) for layer_type, v in settings.items()}
    settings.setdefault("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    return settings


def apply_rope(x_BxLxNxK: jnp.ndarray, cos_LxR: jnp.ndarray, sin_LxR: jnp.ndarray) -> jnp.ndarray:
    """Rotates the first R dims of each head on halves (rotate_half); the rest pass unchanged
    (partial rotary, as GPT-NeoX)."""
    R = cos_LxR.shape[-1]
    rot, keep = x_BxLxNxK[..., :R], x_BxLxNxK[..., R:]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = rot * cos_LxR[:, None, :] + rotated * sin_LxR[:, None, :]
    return out if keep.shape[-1] == 0 else jnp.concatenate([out, keep], axis=-1)


# ----------------------------------------------------------------------------------------------
# Attention


def attend(q_BxLxHxK: jnp.ndarray, k_BxLxGxK: jnp.ndarray, v_BxLxGxK: jnp.ndarray, rec: HookRecorder,
           past_kv, scale: float, softcap_at: float | None = None, window: int | None = None) -> jnp.ndarray:
    """Causal (or sliding-window) grouped-query attention -> z_BxLxHxK, each head's output before W_O.

    Keeps this pass's (k, v) on `rec` when it is computing a prefix; `past_kv` (k, v: 1xPxGxK or
    BxPxGxK) comes first, and a third element, where present, says how many of its slots hold positions
    (models/past.py). Scores are float32: q.k * scale, soft-capped, masked, softmax; then cast to the
    activations' dtype for the values, as transformers' eager attention does.
    """
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    rec.keep_kv(k_BxLxGxK, v_BxLxGxK)
    k_BxSxGxK, v_BxSxGxK = with_past(past_kv, k_BxLxGxK, v_BxLxGxK)
    q_BxLxGxRxK = q_BxLxHxK.reshape(B, L, G, H // G, K)  # query head h uses kv head h // R
    scores_BxGxRxLxS = jnp.einsum("BLGRK,BSGK->BGRLS", q_BxLxGxRxK, k_BxSxGxK).astype(jnp.float32)
    scores_BxGxRxLxS = softcap(scores_BxGxRxLxS * scale, softcap_at)
    allowed_LxS = causal_mask(L, k_BxSxGxK.shape[1], window, filled(past_kv))
    scores_BxGxRxLxS = jnp.where(allowed_LxS, scores_BxGxRxLxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxGxRxLxS, axis=-1).astype(q_BxLxHxK.dtype)
    z_BxLxGxRxK = jnp.einsum("BGRLS,BSGK->BLGRK", probs, v_BxSxGxK)
    return z_BxLxGxRxK.reshape(B, L, H, K)


# ----------------------------------------------------------------------------------------------
# MLP


def gated_mlp(block: dict, x_BxLxD: jnp.ndarray, layer: int, rec: HookRecorder, activation) -> jnp.ndarray:
    """down(activation(gate(x)) * up(x)) -> mlp_out_BxLxD (Gemma's and Llama's MLP), recording
    TransformerLens's GatedMLP points: hook_pre is the gate, hook_pre_linear the up projection.

    The activation runs in float32 and is cast back to x's dtype. Weights: w_gate_FxD, w_up_FxD, w_down_DxF,
    and biases b_gate_F, b_up_F, b_down_D where the block has them (Llama's mlp_bias).
    """
    gate_BxLxF = jnp.einsum("BLD,FD->BLF", x_BxLxD, block["w_gate_FxD"]) + block.get("b_gate_F", 0)
    rec.record(layer, "mlp.hook_pre", gate_BxLxF)
    up_BxLxF = jnp.einsum("BLD,FD->BLF", x_BxLxD, block["w_up_FxD"]) + block.get("b_up_F", 0)
    rec.record(layer, "mlp.hook_pre_linear", up_BxLxF)
    post_BxLxF = activation(gate_BxLxF.astype(jnp.float32)).astype(x_BxLxD.dtype) * up_BxLxF
    rec.record(layer, "mlp.hook_post", post_BxLxF)
    return jnp.einsum("BLF,DF->BLD", post_BxLxF, block["w_down_DxF"]) + block.get("b_down_D", 0)


def run_blocks(blocks: list, x_BxLxD: jnp.ndarray, rec: HookRecorder, all_layers: bool, prefix_kv: tuple | None,
               block_fn) -> jnp.ndarray | None:
    """Runs `block_fn(block, x_BxLxD, layer, past_kv) -> x_BxLxD` over the blocks and returns the last
    residual, or None when not `all_layers`: then it stops after the deepest block a recorded hook
    needs. `prefix_kv` holds one (k, v) per layer (1xPxGxK, or BxPxGxK: one past per row) from an earlier
    pass."""
    n_run = len(blocks) if all_layers else rec.last_layer + 1
    for layer in range(n_run):
        past = layer_past(prefix_kv, layer)
        x_BxLxD = block_fn(blocks[layer], x_BxLxD, layer, past)
    return x_BxLxD if all_layers else None


def forward_of(block_fn):
    """A family's `forward` from its `block_fn(block, cfg, x_BxLxD, layer, rec, start, past_kv)`, where
    `start` is the absolute position of x's first row (RoPE needs it)."""

    def forward(params: dict, cfg, x_BxLxD: jnp.ndarray, rec: HookRecorder, all_layers: bool = True,
                prefix_kv: tuple | None = None) -> jnp.ndarray | None:
        """Runs the blocks on token embeddings; returns the last residual_BxLxD (before the final norm,
        see `head`), or None when not `all_layers`: then it stops after the deepest block a recorded hook
        needs. With `prefix_kv` (per layer (k, v), 1xPxGxK or BxPxGxK, kept by an earlier pass), x
        continues from position P."""
        start = prefix_length(prefix_kv)
        return run_blocks(params["blocks"], x_BxLxD, rec, all_layers, prefix_kv,
                          lambda block, x, layer, past: block_fn(block, cfg, x, layer, rec, start, past))

    return forward

"""Gemma 3 as pure JAX functions over a parameter pytree: text checkpoints (`gemma3_text`,
Gemma3ForCausalLM: 270m, 1b) and the language model of multimodal ones (`gemma3`,
Gemma3ForConditionalGeneration: 4b, 12b, 27b; its vision tower is never read).

Over Gemma 2: an RMSNorm on each query and key head before RoPE, a RoPE per layer type (`layer_types`:
sliding layers use the local base, full layers the global base, with linear scaling on 4b and larger),
and sliding-window layers interleaved with global ones. As in transformers, `attn_logit_softcapping` is
not applied (Gemma3Attention never passes it), and `final_logit_softcapping` only by Gemma3ForCausalLM
(Gemma3ForConditionalGeneration returns the head's logits as they are).

Shapes: B batch, L/S query/key positions, D d_model, H query heads, G key-value heads, R query heads
per key-value head (H = G * R), K head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from epo_tui.engine.hf_checkpoint import CheckpointTensors
from epo_tui.engine.models.gemma import embed, folded_unembedding_VxD, head, unembedding_VxD  # noqa: F401 (interface)
from epo_tui.engine.models.hooks import (ATTN_INPUT, ATTN_OUTPUT_RAW, ATTN_Z, BLOCK_POINTS, MLP_INPUT, MLP_OUTPUT_RAW,
                                         HookNames, HookRecorder)
from epo_tui.engine.models.layers import (Rope, apply_rope, attend, decoder_dims, forward_of, gated_mlp,
                                          rms_norm, rms_normalized, rope_from_hf)
from epo_tui.errors import UserError

FAMILY = "gemma3"
# TransformerLens cannot centre writing weights for RMSNorm models: SAEs see the raw residual.
CENTERS_WRITES_BY_DEFAULT = False

MULTIMODAL = "gemma3"  # the model_type of Gemma3ForConditionalGeneration checkpoints
LAYER_TYPES = ("sliding_attention", "full_attention")
# Where the decoder sits: transformers 5 checkpoints, then older ones (and a bare Gemma3TextModel's).
_TEXT_PREFIXES = ("model.", "")
_MULTIMODAL_PREFIXES = ("model.language_model.", "language_model.model.")
_MULTIMODAL_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
# Hugging Face activation name -> whether it is the tanh approximation of GELU.
_GELU_APPROXIMATE = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}
# transformers' defaults when a config leaves them out (Gemma3TextConfig.default_theta)
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


@dataclass(frozen=True)
class Gemma3Config:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    vocab_size: int
    max_positions: int
    rms_norm_eps: float
    ropes: tuple[Rope, ...]  # per layer, from its layer type
    gelu_approximate: bool
    query_scale: float  # multiplies q.k: query_pre_attn_scalar ** -0.5
    final_softcap: float | None
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]  # per layer: sliding-window attention
    multimodal: bool  # the language model of a Gemma3ForConditionalGeneration checkpoint

    @classmethod
    def from_hf(cls, hf) -> Gemma3Config:
        """From a Gemma3TextConfig, or a Gemma3Config (its `text_config`). Raises UserError, naming the
        config key, for a variant we do not run."""
        multimodal = hf.model_type == MULTIMODAL
        text = hf.text_config if multimodal else hf
        if getattr(text, "use_bidirectional_attention", None):
            raise UserError("Gemma 3 with use_bidirectional_attention: true is not supported (supported: false, "
                            "causal language models)")
        if getattr(text, "attention_bias", False):
            raise UserError("Gemma 3 with attention_bias: true is not supported (supported: false)")
        act = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None) or "gelu_pytorch_tanh"
        if act not in _GELU_APPROXIMATE:
            raise UserError(f"Gemma 3 with hidden_activation '{act}' is not supported "
                            f"(supported: {', '.join(_GELU_APPROXIMATE)})")
        dims = decoder_dims(text)
        n_layers, head_dim = dims["n_layers"], dims["head_dim"]
        layer_types = tuple(_layer_types(text, n_layers))
        ropes = _ropes(text, head_dim, set(layer_types))
        sliding_window = getattr(text, "sliding_window", None)
        sliding = tuple(bool(sliding_window) and t == "sliding_attention" for t in layer_types)
        return cls(
            **dims,
            ropes=tuple(ropes[t] for t in layer_types),
            gelu_approximate=_GELU_APPROXIMATE[act],
            query_scale=float(text.query_pre_attn_scalar) ** -0.5,
            final_softcap=None if multimodal else getattr(text, "final_logit_softcapping", None),
            sliding_window=sliding_window if any(sliding) else None,
            sliding_layers=sliding,
            multimodal=multimodal,
        )


def _layer_types(text, n_layers: int) -> list[str]:
    """`layer_types`, or (configs without it) every `sliding_window_pattern`-th layer global."""
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        pattern = getattr(text, "sliding_window_pattern", None) or getattr(text, "_sliding_window_pattern", None) or 6
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise UserError(f"Gemma 3's layer_types has {len(layer_types)} entries for num_hidden_layers: {n_layers}")
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise UserError(f"Gemma 3 with layer_types '{unknown[0]}' is not supported "
                        f"(supported: {', '.join(LAYER_TYPES)})")
    return list(layer_types)


def _ropes(text, head_dim: int, layer_types: set[str]) -> dict[str, Rope]:
    """One Rope per layer type: transformers 5's `rope_parameters` (an entry per layer type), or the
    older `rope_theta` (global layers, with `rope_scaling`) and `rope_local_base_freq` (sliding layers)."""
    params = getattr(text, "rope_parameters", None)
    if params and all(isinstance(v, Mapping) for v in params.values()):
        settings = {t: dict(v) for t, v in params.items()}
    else:
        full = dict(params or getattr(text, "rope_scaling", None) or {})
        full.setdefault("rope_theta", getattr(text, "rope_theta", None) or _DEFAULT_THETA["full_attention"])
        local = getattr(text, "rope_local_base_freq", None) or _DEFAULT_THETA["sliding_attention"]
        settings = {"full_attention": full, "sliding_attention": {"rope_theta": local}}
    ropes = {}
    for layer_type in sorted(layer_types):
        if layer_type not in settings:
            raise UserError(f"Gemma 3's rope_parameters has no entry for its layer type '{layer_type}'")
        entry = dict(settings[layer_type])
        entry.setdefault("rope_theta", _DEFAULT_THETA[layer_type])
        ropes[layer_type] = rope_from_hf(entry, head_dim, "Gemma 3")
    return ropes


def checkpoint_filter(hf) -> Callable[[str], bool] | None:
    """Which tensors to read: of a multimodal checkpoint only its language model and head (the vision
    tower and projector never reach memory); None (all) for a text checkpoint."""
    if hf.model_type != MULTIMODAL:
        return None
    keep = ("model.language_model.", "language_model.", "lm_head.")
    return lambda key: key.startswith(keep)


def _language_model_view(checkpoint: CheckpointTensors) -> CheckpointTensors:
    """A multimodal checkpoint with its text config, so errors name the language model's keys; the head
    is tied as the top-level `tie_word_embeddings` says (what Gemma3ForConditionalGeneration ties by)."""
    hf = checkpoint.hf_config
    if getattr(hf, "model_type", None) != MULTIMODAL:
        return checkpoint
    text = copy.copy(hf.text_config)
    text.tie_word_embeddings = getattr(hf, "tie_word_embeddings", True)
    return dataclasses.replace(checkpoint, hf_config=text)


def params_from_checkpoint(checkpoint: CheckpointTensors, cfg: Gemma3Config, n_layers: int) -> dict:
    """HF names -> our pytree. Linear weights stay OutxIn.

    Text checkpoints hold the decoder under `model.` (or bare), multimodal ones under
    `model.language_model.` (transformers 5) or `language_model.model.` (older). `unembed_VxD` is there
    only when the head is not the token embedding. Raises UserError for a missing or mis-shaped tensor.
    """
    checkpoint = _language_model_view(checkpoint)
    H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    q_width, kv_width = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
    sizes = {"hidden_size": D, "intermediate_size": cfg.d_mlp, "head_dim": K, q_width: H * K, kv_width: G * K}
    first, *others = _MULTIMODAL_PREFIXES if cfg.multimodal else _TEXT_PREFIXES

    def get(key: str, *dims: str, needed_by: str = "model_type") -> jnp.ndarray:
        return checkpoint.get(first + key, [(d, sizes[d]) for d in dims], needed_by,
                              aliases=tuple(p + key for p in others))

    blocks = []
    for i in range(n_layers):
        def layer(key: str, *dims: str) -> jnp.ndarray:
            return get(f"layers.{i}.{key}", *dims, needed_by="num_hidden_layers")

        blocks.append({
            "ln_attn_w": layer("input_layernorm.weight", "hidden_size"),
            "w_q_HxKxD": layer("self_attn.q_proj.weight", q_width, "hidden_size").reshape(H, K, D),
            "w_k_GxKxD": layer("self_attn.k_proj.weight", kv_width, "hidden_size").reshape(G, K, D),
            "w_v_GxKxD": layer("self_attn.v_proj.weight", kv_width, "hidden_size").reshape(G, K, D),
            "ln_q_w": layer("self_attn.q_norm.weight", "head_dim"),
            "ln_k_w": layer("self_attn.k_norm.weight", "head_dim"),
            "w_o_DxHxK": layer("self_attn.o_proj.weight", "hidden_size", q_width).reshape(D, H, K),
            "ln_attn_post_w": layer("post_attention_layernorm.weight", "hidden_size"),
            "ln_mlp_w": layer("pre_feedforward_layernorm.weight", "hidden_size"),
            "w_gate_FxD": layer("mlp.gate_proj.weight", "intermediate_size", "hidden_size"),
            "w_up_FxD": layer("mlp.up_proj.weight", "intermediate_size", "hidden_size"),
            "w_down_DxF": layer("mlp.down_proj.weight", "hidden_size", "intermediate_size"),
            "ln_mlp_post_w": layer("post_feedforward_layernorm.weight", "hidden_size"),
        })
    head_name = "lm_head.weight"
    if cfg.multimodal:
        head_name = checkpoint.find(_MULTIMODAL_HEADS[0], _MULTIMODAL_HEADS[1:]) or head_name
    embed_VxD, unembed_VxD = checkpoint.embedding_and_head(
        first + "embed_tokens.weight", tuple(p + "embed_tokens.weight" for p in others),
        [("vocab_size", cfg.vocab_size), ("hidden_size", D)], head=head_name)
    params = {"embed_VxD": embed_VxD, "lnf_w": get("norm.weight", "hidden_size"), "blocks": blocks}
    if unembed_VxD is not None:
        params["unembed_VxD"] = unembed_VxD
    return params


def _attention(block: dict, cfg: Gemma3Config, x_BxLxD: jnp.ndarray, layer: int, start: int, rec: HookRecorder,
               past_kv) -> jnp.ndarray:
    """Causal (or sliding-window) attention with per-head q/k norms -> attn_out_BxLxD before the
    post-attention norm; `past_kv` (k, v of a fixed prefix, 1xPxGxK, already normed and rotated) first."""
    eps = cfg.rms_norm_eps
    cos, sin = cfg.ropes[layer].tables(x_BxLxD.shape[1], x_BxLxD.dtype, start)
    q_BxLxHxK = jnp.einsum("BLD,HKD->BLHK", x_BxLxD, block["w_q_HxKxD"])
    k_BxLxGxK = jnp.einsum("BLD,GKD->BLGK", x_BxLxD, block["w_k_GxKxD"])
    v_BxLxGxK = jnp.einsum("BLD,GKD->BLGK", x_BxLxD, block["w_v_GxKxD"])
    q_BxLxHxK = apply_rope(rms_norm(q_BxLxHxK, block["ln_q_w"], eps, offset=1.0), cos, sin)
    k_BxLxGxK = apply_rope(rms_norm(k_BxLxGxK, block["ln_k_w"], eps, offset=1.0), cos, sin)
    window = cfg.sliding_window if cfg.sliding_layers[layer] else None
    z_BxLxHxK = attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, rec, past_kv, cfg.query_scale, None, window)
    rec.record(layer, "attn.hook_z", z_BxLxHxK)  # no value bias: the same for both names
    rec.record(layer, ATTN_Z, z_BxLxHxK)
    return jnp.einsum("BLHK,DHK->BLD", z_BxLxHxK, block["w_o_DxHxK"])


def _block(block: dict, cfg: Gemma3Config, x_BxLxD: jnp.ndarray, layer: int, rec: HookRecorder,
           start: int, past_kv) -> jnp.ndarray:
    """One Gemma3DecoderLayer: norms before and after attention and the MLP, each (1 + w)."""
    eps = cfg.rms_norm_eps
    rec.record(layer, "hook_resid_pre", x_BxLxD)
    rec.record(layer, "ln1.hook_normalized", rms_normalized(x_BxLxD, eps))
    attn_in_BxLxD = rms_norm(x_BxLxD, block["ln_attn_w"], eps, offset=1.0)
    rec.record(layer, ATTN_INPUT, attn_in_BxLxD)
    attn_raw_BxLxD = _attention(block, cfg, attn_in_BxLxD, layer, start, rec, past_kv)
    rec.record(layer, ATTN_OUTPUT_RAW, attn_raw_BxLxD)
    attn_out_BxLxD = rms_norm(attn_raw_BxLxD, block["ln_attn_post_w"], eps, offset=1.0)
    rec.record(layer, "hook_attn_out", attn_out_BxLxD)
    x_BxLxD = x_BxLxD + attn_out_BxLxD
    rec.record(layer, "hook_resid_mid", x_BxLxD)
    rec.record(layer, "hook_mlp_in", x_BxLxD)
    rec.record(layer, "ln2.hook_normalized", rms_normalized(x_BxLxD, eps))
    mlp_in_BxLxD = rms_norm(x_BxLxD, block["ln_mlp_w"], eps, offset=1.0)
    rec.record(layer, MLP_INPUT, mlp_in_BxLxD)
    mlp_raw_BxLxD = gated_mlp(block, mlp_in_BxLxD, layer, rec, partial(jax.nn.gelu, approximate=cfg.gelu_approximate))
    rec.record(layer, MLP_OUTPUT_RAW, mlp_raw_BxLxD)
    mlp_out_BxLxD = rms_norm(mlp_raw_BxLxD, block["ln_mlp_post_w"], eps, offset=1.0)
    rec.record(layer, "hook_mlp_out", mlp_out_BxLxD)
    x_BxLxD = x_BxLxD + mlp_out_BxLxD
    rec.record(layer, "hook_resid_post", x_BxLxD)
    return x_BxLxD


forward = forward_of(_block)


# Gemma3DecoderLayer's modules (relative to the layer, `.input`/`.output`) -> the point holding the same
# activation. q/k/v projections' outputs, the q/k norms and the MLP's activation output hold no point.
_MODULES = {
    "input": "hook_resid_pre", "output": "hook_resid_post",
    "input_layernorm.input": "hook_resid_pre", "input_layernorm.output": ATTN_INPUT,
    "self_attn.input": ATTN_INPUT, "self_attn.q_proj.input": ATTN_INPUT, "self_attn.k_proj.input": ATTN_INPUT,
    "self_attn.v_proj.input": ATTN_INPUT,
    "self_attn.o_proj.input": ATTN_Z, "self_attn.o_proj.output": ATTN_OUTPUT_RAW, "self_attn.output": ATTN_OUTPUT_RAW,
    "post_attention_layernorm.input": ATTN_OUTPUT_RAW, "post_attention_layernorm.output": "hook_attn_out",
    "pre_feedforward_layernorm.input": "hook_resid_mid", "pre_feedforward_layernorm.output": MLP_INPUT,
    "mlp.input": MLP_INPUT, "mlp.gate_proj.input": MLP_INPUT, "mlp.up_proj.input": MLP_INPUT,
    "mlp.gate_proj.output": "mlp.hook_pre", "mlp.act_fn.input": "mlp.hook_pre",
    "mlp.up_proj.output": "mlp.hook_pre_linear", "mlp.down_proj.input": "mlp.hook_post",
    "mlp.down_proj.output": MLP_OUTPUT_RAW, "mlp.output": MLP_OUTPUT_RAW,
    "post_feedforward_layernorm.input": MLP_OUTPUT_RAW, "post_feedforward_layernorm.output": "hook_mlp_out",
}
# Gemma Scope 2 writes `model.layers.L` for every size; a multimodal checkpoint's own module paths
# (transformers 5, then older) and a bare Gemma3TextModel's name the same layers.
LAYER_PREFIXES = ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers")


def hook_names(cfg: Gemma3Config) -> HookNames:
    """TransformerLens points and Gemma3DecoderLayer modules, under every prefix of its layers."""
    return HookNames(tl_points=BLOCK_POINTS, layer_prefixes=LAYER_PREFIXES, modules=_MODULES)


def transformer_lens_config(cfg: Gemma3Config) -> Gemma3Config:
    """TransformerLens runs Gemma 3 as transformers does."""
    return cfg


Config = Gemma3Config

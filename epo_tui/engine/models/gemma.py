"""Gemma 1 and Gemma 2 as pure JAX functions over a parameter pytree (weights from HF safetensors).

Gemma 2 adds norms after attention and after the MLP, tanh soft-capping of attention and final logits,
a query scale from `query_pre_attn_scalar`, and a sliding-window mask on its sliding layers.

Shapes: B batch, L/S query/key positions, D d_model, H query heads, G key-value heads, R query heads
per key-value head (H = G * R), K head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from epo_tui.engine.hf_checkpoint import CheckpointTensors
from epo_tui.engine.models.hooks import (ATTN_INPUT, ATTN_OUTPUT_RAW, ATTN_Z, BLOCK_POINTS, MLP_INPUT, MLP_OUTPUT_RAW,
                                         HookNames, HookRecorder)
from epo_tui.engine.models.layers import (Rope, apply_rope, attend, decoder_dims, forward_of, gated_mlp,
                                          hf_rope_settings, rms_norm, rms_normalized, rope_from_hf, softcap)
from epo_tui.errors import UserError

FAMILY = "gemma"
# TransformerLens cannot centre writing weights for RMSNorm models: Gemma SAEs see the raw residual.
CENTERS_WRITES_BY_DEFAULT = False

# Hugging Face activation name -> whether it is the tanh approximation of GELU.
_GELU_APPROXIMATE = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}


@dataclass(frozen=True)
class GemmaConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    vocab_size: int
    max_positions: int
    rms_norm_eps: float
    rope: Rope
    gelu_approximate: bool
    query_scale: float  # multiplies q.k
    post_norms: bool  # Gemma 2: post-attention, pre- and post-feedforward norms
    attn_softcap: float | None
    final_softcap: float | None
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]  # per layer: sliding-window attention

    @classmethod
    def from_hf(cls, hf) -> GemmaConfig:
        gemma2 = hf.model_type == "gemma2"
        act = _activation(hf, gemma2)
        if getattr(hf, "use_bidirectional_attention", None):
            raise UserError("Gemma with use_bidirectional_attention is not supported (causal models only)")
        if getattr(hf, "attention_bias", False):
            raise UserError("Gemma with attention_bias is not supported")
        dims = decoder_dims(hf)
        head_dim = dims["head_dim"]
        layer_types = getattr(hf, "layer_types", None) if gemma2 else None
        if gemma2 and layer_types is None:  # transformers < 4.53: even layers slide
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(hf.num_hidden_layers)]
        sliding_window = getattr(hf, "sliding_window", None) if gemma2 else None
        sliding = tuple(bool(sliding_window) and t == "sliding_attention" for t in (layer_types or ()))
        return cls(
            **dims,
            rope=_rope(hf, head_dim),
            gelu_approximate=_GELU_APPROXIMATE[act],
            query_scale=(hf.query_pre_attn_scalar if gemma2 else head_dim) ** -0.5,
            post_norms=gemma2,
            attn_softcap=getattr(hf, "attn_logit_softcapping", None) if gemma2 else None,
            final_softcap=getattr(hf, "final_logit_softcapping", None) if gemma2 else None,
            sliding_window=sliding_window if any(sliding) else None,
            sliding_layers=sliding or (False,) * hf.num_hidden_layers,
        )


def _activation(hf, gemma2: bool) -> str:
    """The MLP activation as transformers runs it. Gemma 1's legacy 'gelu' means the tanh approximation."""
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None) or "gelu_pytorch_tanh"
    if not gemma2 and act == "gelu":
        act = "gelu_pytorch_tanh"
    if act not in _GELU_APPROXIMATE:
        raise UserError(f"Gemma activation '{act}' is not supported ({', '.join(_GELU_APPROXIMATE)})")
    return act


def _rope(hf, head_dim: int) -> Rope:
    """The one RoPE of a Gemma 1/2 config (Gemma 3 has one per layer type: models/gemma3.py)."""
    settings = hf_rope_settings(hf)
    if all(isinstance(v, dict) for v in settings.values()):  # one entry per layer type
        if len({tuple(sorted(v.items())) for v in settings.values()}) > 1:
            raise UserError("Gemma with a different RoPE per layer type is not supported")
        settings = next(iter(settings.values()))
    return rope_from_hf(settings, head_dim, "Gemma")


def params_from_checkpoint(checkpoint: CheckpointTensors, cfg: GemmaConfig, n_layers: int) -> dict:
    """HF names (with or without the `model.` prefix) -> our pytree. Linear weights stay OutxIn.

    `unembed_VxD` is there only when the head is not the token embedding (see
    CheckpointTensors.embedding_and_head). Raises UserError for a missing or mis-shaped tensor.
    """
    H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    q_width, kv_width = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
    sizes = {"hidden_size": D, "intermediate_size": cfg.d_mlp, q_width: H * K, kv_width: G * K}

    def get(key: str, *dims: str, needed_by: str = "model_type") -> jnp.ndarray:
        # GemmaForCausalLM saves its body under `model.`, a bare GemmaModel without it
        return checkpoint.get(f"model.{key}", [(d, sizes[d]) for d in dims], needed_by, aliases=(key,))

    blocks = []
    for i in range(n_layers):
        p = f"layers.{i}."

        def layer(key: str, *dims: str) -> jnp.ndarray:
            return get(p + key, *dims, needed_by="num_hidden_layers")

        block = {
            "ln_attn_w": layer("input_layernorm.weight", "hidden_size"),
            "w_q_HxKxD": layer("self_attn.q_proj.weight", q_width, "hidden_size").reshape(H, K, D),
            "w_k_GxKxD": layer("self_attn.k_proj.weight", kv_width, "hidden_size").reshape(G, K, D),
            "w_v_GxKxD": layer("self_attn.v_proj.weight", kv_width, "hidden_size").reshape(G, K, D),
            "w_o_DxHxK": layer("self_attn.o_proj.weight", "hidden_size", q_width).reshape(D, H, K),
            "w_gate_FxD": layer("mlp.gate_proj.weight", "intermediate_size", "hidden_size"),
            "w_up_FxD": layer("mlp.up_proj.weight", "intermediate_size", "hidden_size"),
            "w_down_DxF": layer("mlp.down_proj.weight", "hidden_size", "intermediate_size"),
        }
        if cfg.post_norms:  # Gemma 2's post_attention_layernorm follows attention ...
            block["ln_attn_post_w"] = layer("post_attention_layernorm.weight", "hidden_size")
            block["ln_mlp_w"] = layer("pre_feedforward_layernorm.weight", "hidden_size")
            block["ln_mlp_post_w"] = layer("post_feedforward_layernorm.weight", "hidden_size")
        else:  # ... Gemma 1's precedes the MLP
            block["ln_mlp_w"] = layer("post_attention_layernorm.weight", "hidden_size")
        blocks.append(block)
    embed_VxD, unembed_VxD = checkpoint.embedding_and_head(
        "model.embed_tokens.weight", ("embed_tokens.weight",), [("vocab_size", cfg.vocab_size), ("hidden_size", D)])
    params = {"embed_VxD": embed_VxD, "lnf_w": get("norm.weight", "hidden_size"), "blocks": blocks}
    if unembed_VxD is not None:
        params["unembed_VxD"] = unembed_VxD
    return params


def embed(params: dict, cfg: GemmaConfig, tokens_or_onehot: jnp.ndarray) -> jnp.ndarray:
    """Token embeddings x_BxLxD (times sqrt(d_model) in the weights' dtype, as HF does) from ids (BxL)
    or from one-hot rows (BxLxV, differentiable)."""
    w_VxD = params["embed_VxD"]
    if tokens_or_onehot.ndim == 3:
        x_BxLxD = jnp.einsum("BLV,VD->BLD", tokens_or_onehot.astype(w_VxD.dtype), w_VxD)
    else:
        x_BxLxD = w_VxD[tokens_or_onehot]
    return x_BxLxD * jnp.asarray(cfg.d_model**0.5, dtype=w_VxD.dtype)


def _attention(block: dict, cfg: GemmaConfig, x_BxLxD: jnp.ndarray, layer: int, rope: Rope,
               start: int, rec: HookRecorder, past_kv) -> jnp.ndarray:
    """Causal (or sliding-window) attention -> attn_out_BxLxD before any post-attention norm; `past_kv`
    (k, v of a fixed prefix, 1xPxGxK) comes first."""
    cos, sin = rope.tables(x_BxLxD.shape[1], x_BxLxD.dtype, start)
    q_BxLxHxK = apply_rope(jnp.einsum("BLD,HKD->BLHK", x_BxLxD, block["w_q_HxKxD"]), cos, sin)
    k_BxLxGxK = apply_rope(jnp.einsum("BLD,GKD->BLGK", x_BxLxD, block["w_k_GxKxD"]), cos, sin)
    v_BxLxGxK = jnp.einsum("BLD,GKD->BLGK", x_BxLxD, block["w_v_GxKxD"])
    window = cfg.sliding_window if cfg.sliding_layers[layer] else None
    z_BxLxHxK = attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, rec, past_kv, cfg.query_scale, cfg.attn_softcap, window)
    rec.record(layer, "attn.hook_z", z_BxLxHxK)  # no value bias: the same for both names
    rec.record(layer, ATTN_Z, z_BxLxHxK)
    return jnp.einsum("BLHK,DHK->BLD", z_BxLxHxK, block["w_o_DxHxK"])


def _block(block: dict, cfg: GemmaConfig, x_BxLxD: jnp.ndarray, layer: int, rec: HookRecorder,
           start: int, past_kv) -> jnp.ndarray:
    eps = cfg.rms_norm_eps
    rec.record(layer, "hook_resid_pre", x_BxLxD)
    rec.record(layer, "ln1.hook_normalized", rms_normalized(x_BxLxD, eps))
    attn_in_BxLxD = rms_norm(x_BxLxD, block["ln_attn_w"], eps, offset=1.0)
    rec.record(layer, ATTN_INPUT, attn_in_BxLxD)
    attn_out = _attention(block, cfg, attn_in_BxLxD, layer, cfg.rope, start, rec, past_kv)
    if cfg.post_norms:
        rec.record(layer, ATTN_OUTPUT_RAW, attn_out)
        attn_out = rms_norm(attn_out, block["ln_attn_post_w"], eps, offset=1.0)
    rec.record(layer, "hook_attn_out", attn_out)
    x_BxLxD = x_BxLxD + attn_out
    rec.record(layer, "hook_resid_mid", x_BxLxD)
    rec.record(layer, "hook_mlp_in", x_BxLxD)
    rec.record(layer, "ln2.hook_normalized", rms_normalized(x_BxLxD, eps))
    normed_BxLxD = rms_norm(x_BxLxD, block["ln_mlp_w"], eps, offset=1.0)
    rec.record(layer, MLP_INPUT, normed_BxLxD)
    mlp_out = gated_mlp(block, normed_BxLxD, layer, rec, partial(jax.nn.gelu, approximate=cfg.gelu_approximate))
    if cfg.post_norms:
        rec.record(layer, MLP_OUTPUT_RAW, mlp_out)
        mlp_out = rms_norm(mlp_out, block["ln_mlp_post_w"], eps, offset=1.0)
    rec.record(layer, "hook_mlp_out", mlp_out)
    x_BxLxD = x_BxLxD + mlp_out
    rec.record(layer, "hook_resid_post", x_BxLxD)
    return x_BxLxD


forward = forward_of(_block)


def head(params: dict, cfg: GemmaConfig, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
    """logits_BxLxV (float32) of final residuals: the final norm, then the unembedding
    (soft-capped where the config says)."""
    x_BxLxD = rms_norm(x_BxLxD, params["lnf_w"], cfg.rms_norm_eps, offset=1.0)
    logits_BxLxV = jnp.einsum("BLD,VD->BLV", x_BxLxD, unembedding_VxD(params)).astype(jnp.float32)
    return softcap(logits_BxLxV, cfg.final_softcap)


def hook_names(cfg: GemmaConfig) -> HookNames:
    """TransformerLens points and transformers modules (GemmaDecoderLayer / Gemma2DecoderLayer)."""
    modules = {"input": "hook_resid_pre", "output": "hook_resid_post",
               "input_layernorm.output": ATTN_INPUT, "self_attn.input": ATTN_INPUT,
               "self_attn.o_proj.input": ATTN_Z, "mlp.input": MLP_INPUT,
               "mlp.gate_proj.output": "mlp.hook_pre", "mlp.up_proj.output": "mlp.hook_pre_linear",
               "mlp.down_proj.input": "mlp.hook_post"}
    if cfg.post_norms:  # Gemma 2: norms after attention and after the MLP, and one before the MLP
        modules.update({"self_attn.output": ATTN_OUTPUT_RAW, "self_attn.o_proj.output": ATTN_OUTPUT_RAW,
                        "post_attention_layernorm.output": "hook_attn_out",
                        "pre_feedforward_layernorm.input": "hook_resid_mid",
                        "pre_feedforward_layernorm.output": MLP_INPUT,
                        "mlp.output": MLP_OUTPUT_RAW, "mlp.down_proj.output": MLP_OUTPUT_RAW,
                        "post_feedforward_layernorm.output": "hook_mlp_out"})
    else:  # Gemma 1: post_attention_layernorm is the MLP's input norm
        modules.update({"self_attn.output": "hook_attn_out", "self_attn.o_proj.output": "hook_attn_out",
                        "post_attention_layernorm.input": "hook_resid_mid",
                        "post_attention_layernorm.output": MLP_INPUT,
                        "mlp.output": "hook_mlp_out", "mlp.down_proj.output": "hook_mlp_out"})
    return HookNames(tl_points=BLOCK_POINTS, layer_prefixes=("model.layers", "layers"), modules=modules)


def transformer_lens_config(cfg: GemmaConfig) -> GemmaConfig:
    """The config as TransformerLens runs it: its Gemma 1 uses exact GELU (transformers: the tanh
    approximation), so SAEs trained on TransformerLens activations (gemma-2b-res-jb) saw exact GELU."""
    return cfg if cfg.post_norms else dataclasses.replace(cfg, gelu_approximate=False)


def unembedding_VxD(params: dict) -> jnp.ndarray:
    """W_U (VxD): lm_head's own weight when the checkpoint unties it, else the token embedding."""
    return params.get("unembed_VxD", params["embed_VxD"])


def folded_unembedding_VxD(params: dict) -> jnp.ndarray:
    """W_U (VxD) with the final RMSNorm's (1 + w) gain folded in, for reading residual directions."""
    return unembedding_VxD(params) * (1.0 + params["lnf_w"])


Config = GemmaConfig

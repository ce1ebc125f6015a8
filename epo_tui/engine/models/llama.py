"""Llama-style decoders as pure JAX functions over a parameter pytree (weights from HF safetensors).

One module for the Hugging Face model types that share Llama's block (pre-RMSNorm, rotary GQA
attention, SiLU-gated MLP), each read from its own config fields:

- `llama` (Llama 2/3.x, DeepSeek-R1-Distill-Llama): `attention_bias` (q/k/v/o), `mlp_bias`, RoPE with
  `llama3` or `linear` scaling, tied or untied head;
- `mistral`: a sliding window on every layer when `sliding_window` is set;
- `qwen2` (Qwen 2/2.5): q/k/v biases always; sliding windows per `layer_types`
  (`use_sliding_window` + `max_window_layers`);
- `qwen3`: RMSNorm of each query and key head (`q_norm`, `k_norm`) before RoPE, `attention_bias`,
  sliding windows as Qwen 2;
- `qwen3_moe` (Qwen3-30B-A3B): Qwen 3's attention with a sparse mixture of experts as the MLP of the
  layers `decoder_sparse_step` / `mlp_only_layers` pick (models/moe.py).

Shapes: B batch, L/S query/key positions, D d_model, H query heads, G key-value heads, K head dim,
F MLP width, E experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from epo_tui.engine.hf_checkpoint import CheckpointTensors
from epo_tui.engine.models.hooks import (ATTN_INPUT, ATTN_Z, BLOCK_POINTS, MLP_INPUT, HookNames,
                                         HookRecorder)
from epo_tui.engine.models.layers import (Rope, apply_rope, attend, decoder_dims, forward_of, gated_mlp,
                                          hf_rope_settings, rms_norm, rms_normalized, rope_from_hf)
from epo_tui.engine.models.moe import moe_mlp
from epo_tui.errors import UserError

FAMILY = "llama"
# TransformerLens cannot centre writing weights for RMSNorm models: SAEs see the raw residual.
CENTERS_WRITES_BY_DEFAULT = False

# model_type -> (its name in errors, q/k/v bias always, q/k norm, sliding windows from layer_types)
_TYPES = {
    "llama": ("Llama", False, False, False),
    "mistral": ("Mistral", False, False, False),
    "qwen2": ("Qwen2", True, False, True),
    "qwen3": ("Qwen3", False, True, True),
    "qwen3_moe": ("Qwen3-MoE", False, True, False),
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int  # the dense MLP's width (intermediate_size)
    vocab_size: int
    max_positions: int
    rms_norm_eps: float
    rope: Rope
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen 3: RMSNorm over each query/key head before RoPE
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]  # per layer: sliding-window attention
    moe_layers: tuple[bool, ...] = ()  # per layer: a sparse mixture of experts replaces the MLP
    n_experts: int = 0
    experts_per_token: int = 0
    d_expert: int = 0  # each expert's MLP width (moe_intermediate_size)
    norm_topk_prob: bool = False  # renormalise the chosen experts' probabilities to sum to 1

    @classmethod
    def from_hf(cls, hf) -> LlamaConfig:
        name, qkv_bias_always, qk_norm, layer_typed = _TYPES[hf.model_type]
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{name} with hidden_act '{act}' is not supported (hidden_act: silu)")
        dims = decoder_dims(hf)
        n_layers, head_dim = dims["n_layers"], dims["head_dim"]
        attention_bias = bool(getattr(hf, "attention_bias", False))
        sliding_window, sliding = _sliding(hf, name, layer_typed)
        moe = _moe_layers(hf) if hf.model_type == "qwen3_moe" else (False,) * n_layers
        return cls(
            **dims,
            rope=_rope(hf, head_dim, name),
            qkv_bias=qkv_bias_always or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=qk_norm,
            sliding_window=sliding_window if any(sliding) else None,
            sliding_layers=sliding,
            moe_layers=moe,
            n_experts=hf.num_experts if any(moe) else 0,
            experts_per_token=hf.num_experts_per_tok if any(moe) else 0,
            d_expert=hf.moe_intermediate_size if any(moe) else 0,
            norm_topk_prob=bool(getattr(hf, "norm_topk_prob", False)) and any(moe),
        )


def _rope(hf, head_dim: int, name: str) -> Rope:
    settings = hf_rope_settings(hf)
    if all(isinstance(v, dict) for v in settings.values()):
        raise UserError(f"{name} with a RoPE per layer type (rope_parameters) is not supported")
    factor = settings.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    if factor not in (None, 1, 1.0):  # transformers' Llama-style attention rotates every dim
        raise UserError(f"{name} with partial_rotary_factor {factor} is not supported (1.0)")
    return rope_from_hf(settings, head_dim, name)


def _sliding(hf, name: str, layer_typed: bool) -> tuple[int | None, tuple[bool, ...]]:
    """(window, per-layer sliding) as transformers applies them: Mistral and Qwen3-MoE slide on every
    layer when `sliding_window` is set; Qwen 2/3 on the layers `layer_types` names sliding (built from
    use_sliding_window and max_window_layers when the config has none). Llama has no window."""
    n = hf.num_hidden_layers
    if hf.model_type == "llama":
        return None, (False,) * n
    window = getattr(hf, "sliding_window", None)
    if hf.model_type == "qwen3_moe" and not getattr(hf, "use_sliding_window", False):
        window = None
    if not layer_typed:
        return window, (bool(window),) * n
    types = getattr(hf, "layer_types", None) or ["full_attention"] * n
    unknown = sorted(set(types) - set(_LAYER_TYPES))
    if unknown:
        raise UserError(f"{name} with layer_types '{unknown[0]}' is not supported ({', '.join(_LAYER_TYPES)})")
    if len(types) != n:
        raise UserError(f"{name} config gives {len(types)} layer_types for num_hidden_layers {n}")
    sliding = tuple(t == "sliding_attention" for t in types)
    if any(sliding) and not window:
        raise UserError(f"{name} with sliding_attention layers needs sliding_window (found {window!r})")
    return window, sliding


def _moe_layers(hf) -> tuple[bool, ...]:
    """Which layers hold a sparse MoE block, as Qwen3MoeDecoderLayer decides."""
    step, only_dense = hf.decoder_sparse_step, set(getattr(hf, "mlp_only_layers", None) or ())
    return tuple(i not in only_dense and hf.num_experts > 0 and (i + 1) % step == 0
                 for i in range(hf.num_hidden_layers))


def params_from_checkpoint(checkpoint: CheckpointTensors, cfg: LlamaConfig, n_layers: int) -> dict:
    """HF names (with or without the `model.` prefix) -> our pytree. Linear weights stay OutxIn.

    Biases, q/k norms and experts are there only where the config has them; `unembed_VxD` only when
    the head is not the token embedding (see CheckpointTensors.embedding_and_head). Raises UserError
    for a missing or mis-shaped tensor.
    """
    H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    q_width, kv_width = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
    sizes = {"hidden_size": D, "intermediate_size": cfg.d_mlp, q_width: H * K, kv_width: G * K,
             "head_dim": K, "num_experts": cfg.n_experts, "moe_intermediate_size": cfg.d_expert,
             "2*moe_intermediate_size": 2 * cfg.d_expert}

    def get(key: str, *dims: str, needed_by: str = "model_type") -> jnp.ndarray:
        # *ForCausalLM saves its body under `model.`, a bare *Model without it
        return checkpoint.get(f"model.{key}", [(d, sizes[d]) for d in dims], needed_by, aliases=(key,))

    blocks = []
    for i in range(n_layers):
        p = f"layers.{i}."

        def layer(key: str, *dims: str, needed_by: str = "num_hidden_layers") -> jnp.ndarray:
            return get(p + key, *dims, needed_by=needed_by)

        block = {
            "ln_attn_w": layer("input_layernorm.weight", "hidden_size"),
            "w_q_HxKxD": layer("self_attn.q_proj.weight", q_width, "hidden_size").reshape(H, K, D),
            "w_k_GxKxD": layer("self_attn.k_proj.weight", kv_width, "hidden_size").reshape(G, K, D),
            "w_v_GxKxD": layer("self_attn.v_proj.weight", kv_width, "hidden_size").reshape(G, K, D),
            "w_o_DxHxK": layer("self_attn.o_proj.weight", "hidden_size", q_width).reshape(D, H, K),
            "ln_mlp_w": layer("post_attention_layernorm.weight", "hidden_size"),
        }
        if cfg.qkv_bias:
            bias_key = "attention_bias" if cfg.o_bias else "model_type"
            block["b_q_HxK"] = layer("self_attn.q_proj.bias", q_width, needed_by=bias_key).reshape(H, K)
            block["b_k_GxK"] = layer("self_attn.k_proj.bias", kv_width, needed_by=bias_key).reshape(G, K)
            block["b_v_GxK"] = layer("self_attn.v_proj.bias", kv_width, needed_by=bias_key).reshape(G, K)
        if cfg.o_bias:
            block["b_o_D"] = layer("self_attn.o_proj.bias", "hidden_size", needed_by="attention_bias")
        if cfg.qk_norm:
            block["q_norm_w_K"] = layer("self_attn.q_norm.weight", "head_dim", needed_by="model_type")
            block["k_norm_w_K"] = layer("self_attn.k_norm.weight", "head_dim", needed_by="model_type")
        if cfg.moe_layers[i]:
            block.update(_experts(checkpoint, f"model.{p}mlp.", sizes))
        else:
            block["w_gate_FxD"] = layer("mlp.gate_proj.weight", "intermediate_size", "hidden_size")
            block["w_up_FxD"] = layer("mlp.up_proj.weight", "intermediate_size", "hidden_size")
            block["w_down_DxF"] = layer("mlp.down_proj.weight", "hidden_size", "intermediate_size")
            if cfg.mlp_bias:
                block["b_gate_F"] = layer("mlp.gate_proj.bias", "intermediate_size", needed_by="mlp_bias")
                block["b_up_F"] = layer("mlp.up_proj.bias", "intermediate_size", needed_by="mlp_bias")
                block["b_down_D"] = layer("mlp.down_proj.bias", "hidden_size", needed_by="mlp_bias")
        blocks.append(block)
    embed_VxD, unembed_VxD = checkpoint.embedding_and_head(
        "model.embed_tokens.weight", ("embed_tokens.weight",), [("vocab_size", cfg.vocab_size), ("hidden_size", D)])
    params = {"embed_VxD": embed_VxD, "lnf_w": get("norm.weight", "hidden_size"), "blocks": blocks}
    if unembed_VxD is not None:
        params["unembed_VxD"] = unembed_VxD
    return params


def _experts(checkpoint: CheckpointTensors, prefix: str, sizes: dict) -> dict:
    """One MoE block's router and experts: `mlp.experts.{e}.gate_proj.weight` etc. as the hub saves
    them, or transformers 5's fused `mlp.experts.gate_up_proj` (ExFxD gate rows, then up rows)."""
    short = prefix.removeprefix("model.")

    def get(key: str, *dims: str) -> jnp.ndarray:
        return checkpoint.get(prefix + key, [(d, sizes[d]) for d in dims], "num_experts", aliases=(short + key,))

    E, F = sizes["num_experts"], sizes["moe_intermediate_size"]
    out = {"w_router_ExD": get("gate.weight", "num_experts", "hidden_size")}
    if checkpoint.find(prefix + "experts.gate_up_proj", (short + "experts.gate_up_proj",)):
        gate_up = get("experts.gate_up_proj", "num_experts", "2*moe_intermediate_size", "hidden_size")
        out["w_gate_ExFxD"], out["w_up_ExFxD"] = gate_up[:, :F], gate_up[:, F:]
        out["w_down_ExDxF"] = get("experts.down_proj", "num_experts", "hidden_size", "moe_intermediate_size")
        return out
    per_expert = {name: [get(f"experts.{e}.{name}.weight", *dims) for e in range(E)]
                  for name, dims in (("gate_proj", ("moe_intermediate_size", "hidden_size")),
                                     ("up_proj", ("moe_intermediate_size", "hidden_size")),
                                     ("down_proj", ("hidden_size", "moe_intermediate_size")))}
    out["w_gate_ExFxD"] = jnp.stack(per_expert["gate_proj"])
    out["w_up_ExFxD"] = jnp.stack(per_expert["up_proj"])
    out["w_down_ExDxF"] = jnp.stack(per_expert["down_proj"])
    return out


def embed(params: dict, cfg: LlamaConfig, tokens_or_onehot: jnp.ndarray) -> jnp.ndarray:
    """Token embeddings x_BxLxD (unscaled) from ids (BxL) or from one-hot rows (BxLxV, differentiable)."""
    w_VxD = params["embed_VxD"]
    if tokens_or_onehot.ndim == 3:
        return jnp.einsum("BLV,VD->BLD", tokens_or_onehot.astype(w_VxD.dtype), w_VxD)
    return w_VxD[tokens_or_onehot]


def _attention(block: dict, cfg: LlamaConfig, x_BxLxD: jnp.ndarray, layer: int, start: int,
               rec: HookRecorder, past_kv) -> jnp.ndarray:
    """Causal (or sliding-window) GQA attention -> attn_out_BxLxD; `past_kv` (k, v of a fixed prefix,
    1xPxGxK, after RoPE) comes first."""
    q_BxLxHxK = jnp.einsum("BLD,HKD->BLHK", x_BxLxD, block["w_q_HxKxD"])
    k_BxLxGxK = jnp.einsum("BLD,GKD->BLGK", x_BxLxD, block["w_k_GxKxD"])
    v_BxLxGxK = jnp.einsum("BLD,GKD->BLGK", x_BxLxD, block["w_v_GxKxD"])
    if cfg.qkv_bias:
        q_BxLxHxK, k_BxLxGxK = q_BxLxHxK + block["b_q_HxK"], k_BxLxGxK + block["b_k_GxK"]
        v_BxLxGxK = v_BxLxGxK + block["b_v_GxK"]
    if cfg.qk_norm:
        q_BxLxHxK = rms_norm(q_BxLxHxK, block["q_norm_w_K"], cfg.rms_norm_eps, gain_in_float32=False)
        k_BxLxGxK = rms_norm(k_BxLxGxK, block["k_norm_w_K"], cfg.rms_norm_eps, gain_in_float32=False)
    cos, sin = cfg.rope.tables(x_BxLxD.shape[1], x_BxLxD.dtype, start)
    q_BxLxHxK, k_BxLxGxK = apply_rope(q_BxLxHxK, cos, sin), apply_rope(k_BxLxGxK, cos, sin)
    window = cfg.sliding_window if cfg.sliding_layers[layer] else None
    z_BxLxHxK = attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, rec, past_kv, cfg.head_dim**-0.5, window=window)
    rec.record(layer, ATTN_Z, z_BxLxHxK)
    if cfg.qkv_bias:
        # TransformerLens folds b_V into b_O (fold_value_biases): the probabilities sum to 1, so its
        # hook_z is z minus b_V, each query head's from its key-value head
        b_v_HxK = jnp.repeat(block["b_v_GxK"], cfg.n_heads // cfg.n_kv_heads, axis=0)
        rec.record(layer, "attn.hook_z", z_BxLxHxK - b_v_HxK)
    else:
        rec.record(layer, "attn.hook_z", z_BxLxHxK)
    out_BxLxD = jnp.einsum("BLHK,DHK->BLD", z_BxLxHxK, block["w_o_DxHxK"])
    return out_BxLxD + block["b_o_D"] if cfg.o_bias else out_BxLxD


def _block(block: dict, cfg: LlamaConfig, x_BxLxD: jnp.ndarray, layer: int, rec: HookRecorder,
           start: int, past_kv) -> jnp.ndarray:
    eps = cfg.rms_norm_eps
    rec.record(layer, "hook_resid_pre", x_BxLxD)
    rec.record(layer, "ln1.hook_normalized", rms_normalized(x_BxLxD, eps))
    attn_in_BxLxD = rms_norm(x_BxLxD, block["ln_attn_w"], eps, gain_in_float32=False)
    rec.record(layer, ATTN_INPUT, attn_in_BxLxD)
    attn_out = _attention(block, cfg, attn_in_BxLxD, layer, start, rec, past_kv)
    rec.record(layer, "hook_attn_out", attn_out)
    x_BxLxD = x_BxLxD + attn_out
    rec.record(layer, "hook_resid_mid", x_BxLxD)
    rec.record(layer, "hook_mlp_in", x_BxLxD)
    rec.record(layer, "ln2.hook_normalized", rms_normalized(x_BxLxD, eps))
    normed_BxLxD = rms_norm(x_BxLxD, block["ln_mlp_w"], eps, gain_in_float32=False)
    rec.record(layer, MLP_INPUT, normed_BxLxD)
    if cfg.moe_layers[layer]:
        mlp_out = moe_mlp(block, normed_BxLxD, cfg.experts_per_token, cfg.norm_topk_prob, jax.nn.silu)
    else:
        mlp_out = gated_mlp(block, normed_BxLxD, layer, rec, jax.nn.silu)
    rec.record(layer, "hook_mlp_out", mlp_out)
    x_BxLxD = x_BxLxD + mlp_out
    rec.record(layer, "hook_resid_post", x_BxLxD)
    return x_BxLxD


forward = forward_of(_block)


def head(params: dict, cfg: LlamaConfig, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
    """logits_BxLxV (float32) of final residuals: the final norm, then the unembedding."""
    x_BxLxD = rms_norm(x_BxLxD, params["lnf_w"], cfg.rms_norm_eps, gain_in_float32=False)
    return jnp.einsum("BLD,VD->BLV", x_BxLxD, unembedding_VxD(params)).astype(jnp.float32)


def hook_names(cfg: LlamaConfig) -> HookNames:
    """TransformerLens points and transformers modules (LlamaDecoderLayer and its kin). A model with
    MoE layers has no single MLP width, so it lacks the MLP's inner points."""
    modules = {"input": "hook_resid_pre", "output": "hook_resid_post",
               "input_layernorm.output": ATTN_INPUT, "self_attn.input": ATTN_INPUT,
               "self_attn.o_proj.input": ATTN_Z,
               "self_attn.output": "hook_attn_out", "self_attn.o_proj.output": "hook_attn_out",
               "post_attention_layernorm.input": "hook_resid_mid",
               "post_attention_layernorm.output": MLP_INPUT, "mlp.input": MLP_INPUT,
               "mlp.output": "hook_mlp_out"}
    points = BLOCK_POINTS
    if any(cfg.moe_layers):
        points = tuple(p for p in BLOCK_POINTS if p not in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"))
    else:
        modules.update({"mlp.gate_proj.output": "mlp.hook_pre", "mlp.up_proj.output": "mlp.hook_pre_linear",
                        "mlp.down_proj.input": "mlp.hook_post", "mlp.down_proj.output": "hook_mlp_out"})
    return HookNames(tl_points=points, layer_prefixes=("model.layers", "layers"), modules=modules)


def transformer_lens_config(cfg: LlamaConfig) -> LlamaConfig:
    """The config as TransformerLens runs these models: the same."""
    return cfg


def unembedding_VxD(params: dict) -> jnp.ndarray:
    """W_U (VxD): lm_head's own weight when the checkpoint unties it, else the token embedding."""
    return params.get("unembed_VxD", params["embed_VxD"])


def folded_unembedding_VxD(params: dict) -> jnp.ndarray:
    """W_U (VxD) with the final RMSNorm's gain folded in, for reading residual directions."""
    return unembedding_VxD(params) * params["lnf_w"]


Config = LlamaConfig

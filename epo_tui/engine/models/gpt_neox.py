"""GPT-NeoX (Pythia) as a pure JAX function over a parameter pytree (weights from HF safetensors).

Pre-LayerNorm blocks whose attention and MLP either both read the block's input and are summed into
it (`use_parallel_residual`, every Pythia) or run one after the other as GPT-2's do; rotary position
embeddings on the first `partial_rotary_factor` of each head's dims (Pythia: a quarter); a fused
query/key/value projection laid out per head; an unembedding of its own (`embed_out`, untied).

Shapes: B batch, L/S query/key positions, D d_model, H heads, K head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from epo_tui.engine.hf_checkpoint import CheckpointTensors
from epo_tui.engine.models.hooks import (ATTN_INPUT, ATTN_Z, BLOCK_POINTS, MLP_INPUT, HookNames,
                                         HookRecorder)
from epo_tui.engine.models.layers import (Rope, apply_rope, attend, forward_of, hf_rope_settings, layer_norm,
                                          layer_normalized, rope_from_hf)
from epo_tui.errors import UserError

FAMILY = "gpt_neox"
# TransformerLens centres the writing weights of LayerNorm models by default; SAEs trained on its
# activations (pythia-70m-deduped res-sm, mlp-sm, att-sm) see that unless their config says otherwise.
CENTERS_WRITES_BY_DEFAULT = True

# transformers' `hidden_act` names we run -> the activation (all computed in float32). gelu_new,
# gelu_fast and gelu_pytorch_tanh are the same tanh approximation written three ways.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
# TransformerLens builds every GPT-NeoX with the default RoPE base, whatever the config says.
TRANSFORMER_LENS_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class GPTNeoXConfig:
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab_size: int
    max_positions: int
    layer_norm_eps: float
    rope: Rope  # rotates the first rope.rotary_dim dims of each head
    rotary_pct: float  # partial_rotary_factor: the share of each head's dims that rotate
    activation: str  # a key of ACTIVATIONS
    parallel_residual: bool  # attention and MLP both read the block's input
    attention_bias: bool  # the query/key/value and output projections have biases

    @classmethod
    def from_hf(cls, hf) -> GPTNeoXConfig:
        act = getattr(hf, "hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise UserError(f"GPT-NeoX with hidden_act '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
        head_dim = hf.hidden_size // hf.num_attention_heads
        settings = hf_rope_settings(hf)
        # transformers 5 keeps rotary_pct as rope_parameters' partial_rotary_factor (1.0 when absent)
        rotary_pct = float(settings.get("partial_rotary_factor", getattr(hf, "rotary_pct", 1.0)))
        rotary_dim = int(head_dim * rotary_pct)
        if rotary_dim % 2:
            raise UserError(f"GPT-NeoX with partial_rotary_factor {rotary_pct} rotates {rotary_dim} of its "
                            f"{head_dim} head dims, an odd number (supported: an even number)")
        return cls(
            n_layers=hf.num_hidden_layers,
            d_model=hf.hidden_size,
            n_heads=hf.num_attention_heads,
            d_mlp=hf.intermediate_size,
            vocab_size=hf.vocab_size,
            max_positions=hf.max_position_embeddings,
            layer_norm_eps=hf.layer_norm_eps,
            rope=rope_from_hf(settings, rotary_dim, "GPT-NeoX"),
            rotary_pct=rotary_pct,
            activation=act,
            parallel_residual=bool(getattr(hf, "use_parallel_residual", True)),
            attention_bias=bool(getattr(hf, "attention_bias", True)),
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def params_from_checkpoint(checkpoint: CheckpointTensors, cfg: GPTNeoXConfig, n_layers: int) -> dict:
    """HF names (with or without the `gpt_neox.` prefix) -> our pytree. Linear weights stay OutxIn;
    the fused query_key_value rows are (head, q/k/v, head dim), split here per head.

    Without `attention_bias`, the attention's biases are zeros. `unembed_VxD` is there only when the
    head is not the token embedding (`embed_out.weight`, or `lm_head.weight`). Raises UserError for a
    missing or mis-shaped tensor.
    """
    H, K, D, F = cfg.n_heads, cfg.head_dim, cfg.d_model, cfg.d_mlp
    sizes = {"hidden_size": D, "3*hidden_size": 3 * D, "intermediate_size": F}

    def get(key: str, *dims: str, needed_by: str = "model_type") -> jnp.ndarray:
        # GPTNeoXForCausalLM saves its body under `gpt_neox.`, a bare GPTNeoXModel without it
        return checkpoint.get(f"gpt_neox.{key}", [(d, sizes[d]) for d in dims], needed_by, aliases=(key,))

    blocks = []
    for i in range(n_layers):
        p = f"layers.{i}."

        def layer(key: str, *dims: str, needed_by: str = "num_hidden_layers") -> jnp.ndarray:
            return get(p + key, *dims, needed_by=needed_by)

        w_qkv_Hx3xKxD = layer("attention.query_key_value.weight", "3*hidden_size", "hidden_size").reshape(H, 3, K, D)
        if cfg.attention_bias:
            b_qkv_Hx3xK = layer("attention.query_key_value.bias", "3*hidden_size",
                                needed_by="attention_bias").reshape(H, 3, K)
            b_o_D = layer("attention.dense.bias", "hidden_size", needed_by="attention_bias")
        else:
            b_qkv_Hx3xK, b_o_D = jnp.zeros((H, 3, K), w_qkv_Hx3xKxD.dtype), jnp.zeros(D, w_qkv_Hx3xKxD.dtype)
        blocks.append({
            "ln1_g": layer("input_layernorm.weight", "hidden_size"),
            "ln1_b": layer("input_layernorm.bias", "hidden_size"),
            "w_q_HxKxD": w_qkv_Hx3xKxD[:, 0], "w_k_HxKxD": w_qkv_Hx3xKxD[:, 1], "w_v_HxKxD": w_qkv_Hx3xKxD[:, 2],
            "b_q_HxK": b_qkv_Hx3xK[:, 0], "b_k_HxK": b_qkv_Hx3xK[:, 1], "b_v_HxK": b_qkv_Hx3xK[:, 2],
            "w_o_DxHxK": layer("attention.dense.weight", "hidden_size", "hidden_size").reshape(D, H, K), "b_o": b_o_D,
            "ln2_g": layer("post_attention_layernorm.weight", "hidden_size"),
            "ln2_b": layer("post_attention_layernorm.bias", "hidden_size"),
            "w_in_FxD": layer("mlp.dense_h_to_4h.weight", "intermediate_size", "hidden_size"),
            "b_in_F": layer("mlp.dense_h_to_4h.bias", "intermediate_size"),
            "w_out_DxF": layer("mlp.dense_4h_to_h.weight", "hidden_size", "intermediate_size"),
            "b_out": layer("mlp.dense_4h_to_h.bias", "hidden_size"),
        })
    # checkpoints name the head embed_out (Pythia's, and transformers 5 still saves it so); lm_head is
    # the module's name in transformers 5, which a checkpoint written from its state dict may use
    head = "lm_head.weight" if checkpoint.find("lm_head.weight") and not checkpoint.find("embed_out.weight") \
        else "embed_out.weight"
    embed_VxD, unembed_VxD = checkpoint.embedding_and_head(
        "gpt_neox.embed_in.weight", ("embed_in.weight",), [("vocab_size", cfg.vocab_size), ("hidden_size", D)], head)
    params = {"embed_VxD": embed_VxD, "lnf_g": get("final_layer_norm.weight", "hidden_size"),
              "lnf_b": get("final_layer_norm.bias", "hidden_size"), "blocks": blocks}
    if unembed_VxD is not None:
        params["unembed_VxD"] = unembed_VxD
    return params


def embed(params: dict, cfg: GPTNeoXConfig, tokens_or_onehot: jnp.ndarray) -> jnp.ndarray:
    """Token embeddings x_BxLxD from ids (BxL) or from one-hot rows (BxLxV, differentiable)."""
    if tokens_or_onehot.ndim == 3:
        return jnp.einsum("BLV,VD->BLD", tokens_or_onehot.astype(params["embed_VxD"].dtype), params["embed_VxD"])
    return params["embed_VxD"][tokens_or_onehot]


def _attention(block: dict, cfg: GPTNeoXConfig, x_BxLxD: jnp.ndarray, layer: int, start: int, rec: HookRecorder,
               past_kv) -> jnp.ndarray:
    """Causal self-attention with partial rotary -> attn_out_BxLxD; `past_kv` (k, v of a fixed prefix,
    1xPxHxK) comes first."""
    cos, sin = cfg.rope.tables(x_BxLxD.shape[1], x_BxLxD.dtype, start)
    q_BxLxHxK = apply_rope(jnp.einsum("BLD,HKD->BLHK", x_BxLxD, block["w_q_HxKxD"]) + block["b_q_HxK"], cos, sin)
    k_BxLxHxK = apply_rope(jnp.einsum("BLD,HKD->BLHK", x_BxLxD, block["w_k_HxKxD"]) + block["b_k_HxK"], cos, sin)
    v_BxLxHxK = jnp.einsum("BLD,HKD->BLHK", x_BxLxD, block["w_v_HxKxD"]) + block["b_v_HxK"]
    z_BxLxHxK = attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, rec, past_kv, cfg.head_dim**-0.5)
    rec.record(layer, ATTN_Z, z_BxLxHxK)
    # TransformerLens folds ln1's bias into b_V (fold_ln) and then b_V into b_O (fold_value_biases);
    # the attention probabilities sum to 1, so its hook_z is z minus that constant per head
    b_v_HxK = jnp.einsum("D,HKD->HK", block["ln1_b"], block["w_v_HxKxD"]) + block["b_v_HxK"]
    rec.record(layer, "attn.hook_z", z_BxLxHxK - b_v_HxK)
    return jnp.einsum("BLHK,DHK->BLD", z_BxLxHxK, block["w_o_DxHxK"]) + block["b_o"]


def _mlp(block: dict, cfg: GPTNeoXConfig, x_BxLxD: jnp.ndarray, layer: int, rec: HookRecorder) -> jnp.ndarray:
    """dense_4h_to_h(act(dense_h_to_4h(x))) -> mlp_out_BxLxD; the activation runs in float32."""
    pre_BxLxF = jnp.einsum("BLD,FD->BLF", x_BxLxD, block["w_in_FxD"]) + block["b_in_F"]
    rec.record(layer, "mlp.hook_pre", pre_BxLxF)
    post_BxLxF = ACTIVATIONS[cfg.activation](pre_BxLxF.astype(jnp.float32)).astype(x_BxLxD.dtype)
    rec.record(layer, "mlp.hook_post", post_BxLxF)
    return jnp.einsum("BLF,DF->BLD", post_BxLxF, block["w_out_DxF"]) + block["b_out"]


def _block(block: dict, cfg: GPTNeoXConfig, x_BxLxD: jnp.ndarray, layer: int, rec: HookRecorder,
           start: int, past_kv) -> jnp.ndarray:
    eps = cfg.layer_norm_eps
    rec.record(layer, "hook_resid_pre", x_BxLxD)
    rec.record(layer, "ln1.hook_normalized", layer_normalized(x_BxLxD, eps))
    attn_in_BxLxD = layer_norm(x_BxLxD, block["ln1_g"], block["ln1_b"], eps)
    rec.record(layer, ATTN_INPUT, attn_in_BxLxD)
    attn_out = _attention(block, cfg, attn_in_BxLxD, layer, start, rec, past_kv)
    rec.record(layer, "hook_attn_out", attn_out)
    if cfg.parallel_residual:  # the MLP reads the block's input too: there is no resid_mid
        mlp_resid_BxLxD = x_BxLxD
    else:
        mlp_resid_BxLxD = x_BxLxD + attn_out
        rec.record(layer, "hook_resid_mid", mlp_resid_BxLxD)
    rec.record(layer, "hook_mlp_in", mlp_resid_BxLxD)
    rec.record(layer, "ln2.hook_normalized", layer_normalized(mlp_resid_BxLxD, eps))
    mlp_in_BxLxD = layer_norm(mlp_resid_BxLxD, block["ln2_g"], block["ln2_b"], eps)
    rec.record(layer, MLP_INPUT, mlp_in_BxLxD)
    mlp_out = _mlp(block, cfg, mlp_in_BxLxD, layer, rec)
    rec.record(layer, "hook_mlp_out", mlp_out)
    # summed in transformers' order, so bfloat16 rounds as it does
    x_BxLxD = (mlp_out + attn_out) + x_BxLxD if cfg.parallel_residual else mlp_out + mlp_resid_BxLxD
    rec.record(layer, "hook_resid_post", x_BxLxD)
    return x_BxLxD


forward = forward_of(_block)


def head(params: dict, cfg: GPTNeoXConfig, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
    """logits_BxLxV (float32) of final residuals: the final norm, then the unembedding."""
    x_BxLxD = layer_norm(x_BxLxD, params["lnf_g"], params["lnf_b"], cfg.layer_norm_eps)
    return jnp.einsum("BLD,VD->BLV", x_BxLxD, unembedding_VxD(params)).astype(jnp.float32)


def hook_names(cfg: GPTNeoXConfig) -> HookNames:
    """TransformerLens points and transformers modules (GPTNeoXLayer). A parallel block has no
    resid_mid: its MLP's norm reads the block's input."""
    mlp_resid = "hook_resid_pre" if cfg.parallel_residual else "hook_resid_mid"
    modules = {"input": "hook_resid_pre", "output": "hook_resid_post",
               "input_layernorm.output": ATTN_INPUT, "attention.input": ATTN_INPUT,
               "attention.query_key_value.input": ATTN_INPUT, "attention.dense.input": ATTN_Z,
               "attention.output": "hook_attn_out", "attention.dense.output": "hook_attn_out",
               "post_attention_layernorm.input": mlp_resid, "post_attention_layernorm.output": MLP_INPUT,
               "mlp.input": MLP_INPUT, "mlp.dense_h_to_4h.output": "mlp.hook_pre",
               "mlp.act.output": "mlp.hook_post", "mlp.dense_4h_to_h.input": "mlp.hook_post",
               "mlp.dense_4h_to_h.output": "hook_mlp_out", "mlp.output": "hook_mlp_out"}
    absent = {"mlp.hook_pre_linear"} | ({"hook_resid_mid"} if cfg.parallel_residual else set())
    return HookNames(tl_points=tuple(p for p in BLOCK_POINTS if p not in absent),
                     layer_prefixes=("gpt_neox.layers", "layers"), modules=modules)


def transformer_lens_config(cfg: GPTNeoXConfig) -> GPTNeoXConfig:
    """The config as TransformerLens runs GPT-NeoX: RoPE with base 10000 and no frequency scaling
    whatever the config says, on round(rotary_pct * head_dim) dims. Pythia's own config says the same."""
    rope = Rope(TRANSFORMER_LENS_ROPE_THETA, round(cfg.rotary_pct * cfg.head_dim))
    return dataclasses.replace(cfg, rope=rope)


def unembedding_VxD(params: dict) -> jnp.ndarray:
    """W_U (VxD): the head's own weight when the checkpoint unties it (Pythia), else the token embedding."""
    return params.get("unembed_VxD", params["embed_VxD"])


def folded_unembedding_VxD(params: dict) -> jnp.ndarray:
    """W_U (VxD) with the final LayerNorm's gain folded in (as TransformerLens's fold_ln does), for
    reading residual directions."""
    return unembedding_VxD(params) * params["lnf_g"]


Config = GPTNeoXConfig

"""GPT-2 as a pure JAX function over a parameter pytree (weights from HF safetensors).

Shapes: B batch, L sequence, D d_model, H heads, K head dim, F MLP width, V vocabulary, P positions.
Parameter names end in their shape letters (engine/sharding.py splits them by those).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from epo_tui.engine.hf_checkpoint import CheckpointTensors
from epo_tui.engine.models.hooks import ATTN_INPUT, ATTN_Z, BLOCK_POINTS, MLP_INPUT, HookNames, HookRecorder
from epo_tui.engine.models.past import prefix_length
from epo_tui.engine.models.layers import attend, layer_norm, layer_normalized, run_blocks
from epo_tui.errors import UserError

FAMILY = "gpt2"
# TransformerLens centres the writing weights of LayerNorm models by default; res-jb SAEs see that.
CENTERS_WRITES_BY_DEFAULT = True


@dataclass(frozen=True)
class GPT2Config:
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab_size: int
    max_positions: int
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, hf) -> GPT2Config:
        if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation '{hf.activation_function}' is not supported (gelu_new)")
        if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
            raise UserError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
        return cls(
            n_layers=hf.n_layer,
            d_model=hf.n_embd,
            n_heads=hf.n_head,
            d_mlp=hf.n_inner or 4 * hf.n_embd,
            vocab_size=hf.vocab_size,
            max_positions=hf.n_positions,
            layer_norm_eps=hf.layer_norm_epsilon,
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def params_from_checkpoint(checkpoint: CheckpointTensors, cfg: GPT2Config, n_layers: int) -> dict:
    """HF names (with or without the `transformer.` prefix) -> our pytree. Conv1D weights are DxOut.

    `unembed_VxD` is there only when the head is not the token embedding (see
    CheckpointTensors.embedding_and_head). Raises UserError for a missing or mis-shaped tensor.
    """
    D, F, H, K = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.head_dim
    sizes = {"n_embd": D, "3*n_embd": 3 * D, "n_inner": F, "vocab_size": cfg.vocab_size,
             "n_positions": cfg.max_positions}

    def get(key: str, *dims: str, needed_by: str = "model_type") -> jnp.ndarray:
        # GPT2LMHeadModel saves its body under `transformer.`, a bare GPT2Model without it
        return checkpoint.get(f"transformer.{key}", [(d, sizes[d]) for d in dims], needed_by, aliases=(key,))

    blocks = []
    for i in range(n_layers):
        p = f"h.{i}."

        def block(key: str, *dims: str) -> jnp.ndarray:
            return get(p + key, *dims, needed_by="n_layer")

        blocks.append({
            "ln1_g": block("ln_1.weight", "n_embd"), "ln1_b": block("ln_1.bias", "n_embd"),
            # c_attn's output columns are [q | k | v], each heads x head dim: split so heads can shard
            "w_qkv_Dx3xHxK": block("attn.c_attn.weight", "n_embd", "3*n_embd").reshape(D, 3, H, K),
            "b_qkv": block("attn.c_attn.bias", "3*n_embd"),
            "w_o_HxKxD": block("attn.c_proj.weight", "n_embd", "n_embd").reshape(H, K, D),
            "b_o": block("attn.c_proj.bias", "n_embd"),
            "ln2_g": block("ln_2.weight", "n_embd"), "ln2_b": block("ln_2.bias", "n_embd"),
            "w_in_DxF": block("mlp.c_fc.weight", "n_embd", "n_inner"), "b_in": block("mlp.c_fc.bias", "n_inner"),
            "w_out_FxD": block("mlp.c_proj.weight", "n_inner", "n_embd"), "b_out": block("mlp.c_proj.bias", "n_embd"),
        })
    wte_VxD, unembed_VxD = checkpoint.embedding_and_head(
        "transformer.wte.weight", ("wte.weight",), [("vocab_size", cfg.vocab_size), ("n_embd", D)])
    params = {
        "wte_VxD": wte_VxD, "wpe_PxD": get("wpe.weight", "n_positions", "n_embd"),
        "lnf_g": get("ln_f.weight", "n_embd"), "lnf_b": get("ln_f.bias", "n_embd"), "blocks": blocks,
    }
    if unembed_VxD is not None:
        params["unembed_VxD"] = unembed_VxD
    return params


def embed(params: dict, cfg: GPT2Config, tokens_or_onehot: jnp.ndarray) -> jnp.ndarray:
    """Token embeddings x_BxLxD from ids (BxL) or from one-hot rows (BxLxV, differentiable)."""
    if tokens_or_onehot.ndim == 3:
        return jnp.einsum("BLV,VD->BLD", tokens_or_onehot.astype(params["wte_VxD"].dtype),
                          params["wte_VxD"])
    return params["wte_VxD"][tokens_or_onehot]


def _attention(block: dict, cfg: GPT2Config, x_BxLxD: jnp.ndarray, layer: int, rec: HookRecorder,
               past_kv: tuple[jnp.ndarray, jnp.ndarray] | None) -> jnp.ndarray:
    """Causal self-attention; `past_kv` (k, v of a fixed prefix, 1xPxHxK) is attended to first."""
    w_Dx3xHxK = block["w_qkv_Dx3xHxK"]
    b_3xHxK = block["b_qkv"].reshape(w_Dx3xHxK.shape[1:])
    qkv_BxLx3xHxK = jnp.einsum("BLD,DTHK->BLTHK", x_BxLxD, w_Dx3xHxK) + b_3xHxK
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    z_BxLxHxK = attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, rec, past_kv, cfg.head_dim**-0.5)
    rec.record(layer, ATTN_Z, z_BxLxHxK)
    # TransformerLens folds ln_1's bias into b_V (fold_ln) and then b_V into b_O (fold_value_biases);
    # the attention probabilities sum to 1, so its hook_z is z minus that constant per head
    b_v_HxK = jnp.einsum("D,DHK->HK", block["ln1_b"], w_Dx3xHxK[:, 2]) + b_3xHxK[2]
    rec.record(layer, "attn.hook_z", z_BxLxHxK - b_v_HxK)
    return jnp.einsum("BLHK,HKD->BLD", z_BxLxHxK, block["w_o_HxKxD"]) + block["b_o"]


def _block(block: dict, cfg: GPT2Config, x_BxLxD: jnp.ndarray, layer: int,
           rec: HookRecorder, past_kv) -> jnp.ndarray:
    eps = cfg.layer_norm_eps
    rec.record(layer, "hook_resid_pre", x_BxLxD)
    rec.record(layer, "ln1.hook_normalized", layer_normalized(x_BxLxD, eps))
    attn_in_BxLxD = layer_norm(x_BxLxD, block["ln1_g"], block["ln1_b"], eps)
    rec.record(layer, ATTN_INPUT, attn_in_BxLxD)
    attn_out = _attention(block, cfg, attn_in_BxLxD, layer, rec, past_kv)
    rec.record(layer, "hook_attn_out", attn_out)
    x_BxLxD = x_BxLxD + attn_out
    rec.record(layer, "hook_resid_mid", x_BxLxD)
    rec.record(layer, "hook_mlp_in", x_BxLxD)
    rec.record(layer, "ln2.hook_normalized", layer_normalized(x_BxLxD, eps))
    mlp_in_BxLxD = layer_norm(x_BxLxD, block["ln2_g"], block["ln2_b"], eps)
    rec.record(layer, MLP_INPUT, mlp_in_BxLxD)
    pre_BxLxF = mlp_in_BxLxD @ block["w_in_DxF"] + block["b_in"]
    rec.record(layer, "mlp.hook_pre", pre_BxLxF)
    post_BxLxF = jax.nn.gelu(pre_BxLxF, approximate=True)
    rec.record(layer, "mlp.hook_post", post_BxLxF)
    mlp_out = post_BxLxF @ block["w_out_FxD"] + block["b_out"]
    rec.record(layer, "hook_mlp_out", mlp_out)
    x_BxLxD = x_BxLxD + mlp_out
    rec.record(layer, "hook_resid_post", x_BxLxD)
    return x_BxLxD


def forward(params: dict, cfg: GPT2Config, x_BxLxD: jnp.ndarray, rec: HookRecorder,
            all_layers: bool = True, prefix_kv: tuple | None = None) -> jnp.ndarray | None:
    """Runs the blocks on token embeddings; returns the last residual_BxLxD (before the final norm, see
    `head`), or None when not `all_layers`: then it stops after the deepest block a recorded hook needs.

    With `prefix_kv` (per layer (k, v), 1xPxHxK, kept by an earlier pass over a fixed prefix), x continues
    from position P.
    """
    L, P = x_BxLxD.shape[1], prefix_length(prefix_kv)
    x_BxLxD = x_BxLxD + jax.lax.dynamic_slice_in_dim(params["wpe_PxD"], P, L)  # P may be traced
    return run_blocks(params["blocks"], x_BxLxD, rec, all_layers, prefix_kv,
                      lambda block, x, layer, past: _block(block, cfg, x, layer, rec, past))


def head(params: dict, cfg: GPT2Config, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
    """logits_BxLxV (float32) of final residuals: the final norm, then the unembedding."""
    x_BxLxD = layer_norm(x_BxLxD, params["lnf_g"], params["lnf_b"], cfg.layer_norm_eps)
    return jnp.einsum("BLD,VD->BLV", x_BxLxD, unembedding_VxD(params)).astype(jnp.float32)


def hook_names(cfg: GPT2Config) -> HookNames:
    """TransformerLens points and transformers modules (GPT2Block)."""
    modules = {"input": "hook_resid_pre", "output": "hook_resid_post",
               "ln_1.output": ATTN_INPUT, "attn.input": ATTN_INPUT, "attn.c_proj.input": ATTN_Z,
               "attn.output": "hook_attn_out", "attn.c_proj.output": "hook_attn_out",
               "ln_2.input": "hook_resid_mid", "ln_2.output": MLP_INPUT, "mlp.input": MLP_INPUT,
               "mlp.c_fc.output": "mlp.hook_pre", "mlp.act.output": "mlp.hook_post",
               "mlp.c_proj.input": "mlp.hook_post", "mlp.c_proj.output": "hook_mlp_out",
               "mlp.output": "hook_mlp_out"}
    points = tuple(p for p in BLOCK_POINTS if p != "mlp.hook_pre_linear")
    return HookNames(tl_points=points, layer_prefixes=("transformer.h", "h"), modules=modules)


def transformer_lens_config(cfg: GPT2Config) -> GPT2Config:
    """The config as TransformerLens runs GPT-2: the same (gelu_new)."""
    return cfg


def unembedding_VxD(params: dict) -> jnp.ndarray:
    """W_U (VxD): lm_head's own weight when the checkpoint unties it, else the token embedding."""
    return params.get("unembed_VxD", params["wte_VxD"])


def folded_unembedding_VxD(params: dict) -> jnp.ndarray:
    """W_U (VxD) with ln_f's gain folded in (as TransformerLens's fold_ln does), for reading directions."""
    return unembedding_VxD(params) * params["lnf_g"]


Config = GPT2Config

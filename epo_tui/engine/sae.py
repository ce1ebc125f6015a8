"""SAEs (and transcoders) as plain arrays, encoded in pure JAX as sae-lens runs them at inference.
Loading them through sae-lens, and our cache of them, is sae_loading.py.

Kinds and architectures, as sae-lens runs them at inference:
- `kind` "sae": standard (ReLU), jumprelu (ReLU above a per-latent threshold), topk (the k largest
  pre-activations, ReLU), abstopk (the k largest by magnitude, signed), gated (a gate path opens the
  latent, a magnitude path sizes it). batchtopk and matryoshka_batchtopk are training architectures:
  sae-lens saves them as JumpReLU with the batch threshold for every latent, and so do we.
- `kind` "transcoder" / "skip_transcoder" (transcoder, jumprelu_transcoder, skip_transcoder,
  jumprelu_skip_transcoder): the latents read the input hook (`hook_name`) exactly as an SAE's do,
  without b_dec (it lives in the output space); the decoder writes to `hook_name_out`, `d_out` wide.
  The skip connection only matters for the output, so it is not kept.
- SAEs on attention heads (`attn.hook_z`, reshape_activations "hook_z"): the input is the heads
  concatenated, n_heads * head_dim wide, which is what sae-lens's reshape makes of it.

`SAEParams` is a registered pytree: the arrays are its leaves, everything else is static (part of
the treedef), so it can be passed straight into jitted functions.

Shapes: D d_in (the decoder's `_D` is d_out wide: d_in for an SAE, the output hook's width for a
transcoder), S d_sae, F selected features, K the TopK k; `...` any leading batch dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui.errors import ConfigError, UserError

# sae-lens architecture -> (kind, the activation rule we run)
ARCHITECTURES = {
    "standard": ("sae", "relu"),
    "jumprelu": ("sae", "jumprelu"),
    "topk": ("sae", "topk"),
    "abstopk": ("sae", "abstopk"),
    "gated": ("sae", "gated"),
    "transcoder": ("transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu"),
}
# sae-lens training architectures it saves as another one for inference (save_inference_model)
TRAINING_ONLY = ("batchtopk", "matryoshka_batchtopk")
SUPPORTED = (*ARCHITECTURES, *TRAINING_ONLY)
UNSUPPORTED_WHY = {  # what sae-lens has that cannot be a per-token latent here
    "temporal": "its latents attend over earlier tokens' activations",
    "matching_pursuit": "its latents are chosen by an iterative residual pursuit, not one encoder pass",
}
# Run-time input normalizations (sae-lens SAE._setup_activation_normalization). sae-lens encodes the raw
# input for the other two when their statistics were not folded into the weights: so do we, with a warning.
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
UNFOLDED = ("expected_average_only_in", "covariance_whitening")
LAYER_NORM_EPS = 1e-5  # sae-lens run_time_activation_ln_in's default eps

@dataclass(frozen=True, eq=False)
class SAEParams:
    """An SAE (or transcoder) as plain arrays (float32) plus what is needed to run and describe it."""

    W_enc_DxS: jax.Array
    b_enc_S: jax.Array  # gated: b_mag, the magnitude path's bias
    W_dec_SxD: jax.Array  # d_sae x d_out
    b_dec_D: jax.Array  # d_out
    threshold_S: jax.Array  # JumpReLU thresholds; zeros for other architectures
    architecture: str  # sae-lens's name (ARCHITECTURES); batchtopk kinds are saved as jumprelu
    k: int  # TopK's k; 0 for other architectures
    apply_b_dec_to_input: bool  # never for transcoders
    normalize_activations: str  # NORMALIZATIONS (applied at run time) or UNFOLDED (not applied)
    hook_name: str  # sae-lens name of the hook the latents read, e.g. blocks.8.hook_resid_pre
    d_in: int
    d_sae: int
    dtype: str  # of the arrays; inputs are cast to it, as sae-lens process_sae_in does
    # model_from_pretrained_kwargs["center_writing_weights"]; None: the model family's default
    center_writes: bool | None = None
    release: str | None = None
    id: str | None = None
    path: str | None = None
    neuronpedia_id: str | None = None
    model_name: str | None = None  # the model the SAE was trained on, as sae-lens names it
    cache_key: str | None = None  # names this SAE's converted arrays (and its feature catalog)
    # the model class the SAE's activations came from (sae-lens metadata); None: unknown, which for
    # sae-lens SAEs means TransformerLens's HookedTransformer
    model_class_name: str | None = None
    kind: str = "sae"  # sae | transcoder | skip_transcoder
    d_out: int | None = None  # the decoder's width (d_in for an SAE; None: d_in)
    hook_name_out: str | None = None  # transcoders: the hook the decoder writes to
    hf_hook_name: str | None = None  # the transformers module the latents read, when the config names one
    hf_hook_name_out: str | None = None
    # gated only (None otherwise): the gate path's bias and exp(r_mag), the magnitude path's scale
    b_gate_S: jax.Array | None = None
    mag_scale_S: jax.Array | None = None

    @property
    def display_name(self) -> str:
        return self.path if self.path else f"{self.release} / {self.id}"

    @property
    def activation(self) -> str:
        """The activation rule: relu | jumprelu | topk | abstopk | gated."""
        return ARCHITECTURES[self.architecture][1]

    @property
    def ranks_latents(self) -> bool:
        """Whether a latent's activation depends on the others' (TopK kinds): every latent is computed."""
        return self.activation in ("topk", "abstopk")

    @property
    def read_hook(self) -> str:
        """The hook the latents read: the transformers module when the config names one, else hook_name."""
        return self.hf_hook_name or self.hook_name

    @property
    def write_hook(self) -> str:
        """The hook the decoder writes to: a transcoder's output hook (its transformers module when the
        config names one), else the hook the latents read."""
        if self.kind != "sae" and (self.hf_hook_name_out or self.hook_name_out):
            return self.hf_hook_name_out or self.hook_name_out
        return self.read_hook


ARRAY_FIELDS = ("W_enc_DxS", "b_enc_S", "W_dec_SxD", "b_dec_D", "threshold_S")
GATED_FIELDS = ("b_gate_S", "mag_scale_S")
META_FIELDS = tuple(f.name for f in dataclasses.fields(SAEParams) if f.name not in ARRAY_FIELDS + GATED_FIELDS)
jax.tree_util.register_dataclass(SAEParams, data_fields=[*ARRAY_FIELDS, *GATED_FIELDS],
                                 meta_fields=list(META_FIELDS))


# ----------------------------------------------------------------------------------------------
# Encoding (pure JAX; call inside jit freely)


def process_input(sae: SAEParams, x_xD: jax.Array) -> jax.Array:
    """sae-lens `process_sae_in`: cast, run-time normalization, then minus b_dec if apply_b_dec_to_input.

    An UNFOLDED normalization is not applied: sae-lens's encode does not apply it either.
    """
    x_xD = x_xD.astype(sae.W_enc_DxS.dtype)
    if sae.normalize_activations == "constant_norm_rescale":
        x_xD = x_xD * (math.sqrt(sae.d_in) / jnp.linalg.norm(x_xD, axis=-1, keepdims=True))
    elif sae.normalize_activations == "layer_norm":
        x_xD = x_xD - x_xD.mean(axis=-1, keepdims=True)
        std_x1 = jnp.std(x_xD, axis=-1, keepdims=True, ddof=1)  # torch.std is unbiased
        x_xD = x_xD / (std_x1 + LAYER_NORM_EPS)
    if sae.apply_b_dec_to_input:
        x_xD = x_xD - sae.b_dec_D
    return x_xD


def _encode(sae: SAEParams, sae_in_xD: jax.Array, index_F: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """(pre-activation, gate pre-activation or None) of the latents `index_F` (None: all) of a processed input.

    Gated: sae-lens's gate path is sae_in @ W_enc + b_gate and its magnitude path
    sae_in @ (W_enc * exp(r_mag)) + b_mag; both are affine in the same sae_in @ W_enc column with a
    positive ratio exp(r_mag), so the gate opens exactly when the magnitude pre-activation exceeds
    b_mag - exp(r_mag) * b_gate. The gated latent is a JumpReLU on the magnitude pre-activation, and
    that pre-activation (sae-lens's hook_sae_acts_pre) is our pre-activation: it equals the activation
    whenever the latent is active, and raising it is what opens the gate when it is closed.
    """
    W_enc, b_enc = sae.W_enc_DxS, sae.b_enc_S
    if index_F is not None:
        W_enc, b_enc = W_enc[:, index_F], b_enc[index_F]
    projected = sae_in_xD @ W_enc
    if sae.activation != "gated":
        return projected + b_enc, None
    b_gate, mag_scale = sae.b_gate_S, sae.mag_scale_S
    if index_F is not None:
        b_gate, mag_scale = b_gate[index_F], mag_scale[index_F]
    return projected * mag_scale + b_enc, projected + b_gate


def _elementwise(sae: SAEParams, pre: jax.Array, gate: jax.Array | None, index_F: jax.Array | None) -> jax.Array:
    """ReLU, JumpReLU (ReLU(h) where h > threshold) or gated (ReLU(h) where the gate is open)."""
    if sae.activation == "jumprelu":
        threshold = sae.threshold_S if index_F is None else sae.threshold_S[index_F]
        return jax.nn.relu(pre) * (pre > threshold).astype(pre.dtype)
    if sae.activation == "gated":
        return jax.nn.relu(pre) * (gate > 0).astype(pre.dtype)
    return jax.nn.relu(pre)


def _chosen(sae: SAEParams, pre_xS: jax.Array) -> jax.Array:
    """The k latents TopK keeps (the largest), or AbsTopK (the largest in magnitude): ...xK indices."""
    return jax.lax.top_k(jnp.abs(pre_xS) if sae.activation == "abstopk" else pre_xS, sae.k)[1]


def _kept_value(sae: SAEParams, pre: jax.Array) -> jax.Array:
    """A chosen latent's activation: TopK applies ReLU, AbsTopK keeps the sign."""
    return pre if sae.activation == "abstopk" else jax.nn.relu(pre)


def pre_activations(sae: SAEParams, x_xD: jax.Array) -> jax.Array:
    """hidden_pre ...xS, sae-lens's hook_sae_acts_pre (gated: the magnitude path; see `_encode`)."""
    return _encode(sae, process_input(sae, x_xD), None)[0]


def activations(sae: SAEParams, x_xD: jax.Array) -> jax.Array:
    """Feature activations ...xS for inputs ...xD (sae-lens `encode`)."""
    pre_xS, gate_xS = _encode(sae, process_input(sae, x_xD), None)
    if sae.ranks_latents:
        chosen_xK = _chosen(sae, pre_xS)
        values_xK = _kept_value(sae, jnp.take_along_axis(pre_xS, chosen_xK, axis=-1))
        return jnp.put_along_axis(jnp.zeros_like(pre_xS), chosen_xK, values_xK, axis=-1, inplace=False)
    return _elementwise(sae, pre_xS, gate_xS, None)


def feature_pre_and_act(sae: SAEParams, x_xD: jax.Array, index_or_indices) -> tuple[jax.Array, jax.Array]:
    """(pre-activation, activation) of the selected latents only: shapes ... for one index, ...xF for F.

    Elementwise kinds compute just the selected encoder columns. TopK kinds need every latent's
    pre-activation to know whether a selected latent is among the k kept, so they compute them all.
    """
    index = jnp.asarray(index_or_indices, dtype=jnp.int32)
    index_F = jnp.atleast_1d(index)
    sae_in_xD = process_input(sae, x_xD)
    if sae.ranks_latents:
        pre_xS, _ = _encode(sae, sae_in_xD, None)
        pre_xF = jnp.take(pre_xS, index_F, axis=-1)
        chosen_xK = _chosen(sae, pre_xS)
        kept_xF = (chosen_xK[..., :, None] == index_F).any(axis=-2)
        act_xF = jnp.where(kept_xF, _kept_value(sae, pre_xF), 0.0).astype(pre_xF.dtype)
    else:
        pre_xF, gate_xF = _encode(sae, sae_in_xD, index_F)
        act_xF = _elementwise(sae, pre_xF, gate_xF, index_F)
    if index.ndim == 0:
        return pre_xF[..., 0], act_xF[..., 0]
    return pre_xF, act_xF


# ----------------------------------------------------------------------------------------------
# Checks against the config and the model


def check_feature_index(sae: SAEParams, index: int, source: str | None = None) -> int:
    """The index if 0 <= index < d_sae, else a UserError naming feature.index."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < sae.d_sae:
        message = f"{index} is out of range for this SAE (0..{sae.d_sae - 1})"
        if source is None:
            raise UserError(f"feature.index: {message}")
        if source.startswith("--"):  # given on the command line
            raise UserError(f"{source}: {message}")
        raise ConfigError(source, "feature.index", message)
    return int(index)

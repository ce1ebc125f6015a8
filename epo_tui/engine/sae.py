"""SAEs: loaded once through sae-lens, cached as plain arrays, encoded in pure JAX.

`load_sae` asks sae-lens (`SAE.from_pretrained` for a registry release, `SAE.load_from_disk` for a
local folder), folds what sae-lens folds (the `expected_average_only_in` norm scaling factor in
from_pretrained; TopK decoder norms when `rescale_acts_by_decoder_norm`), and caches the arrays under
`<cache>/saes/<key>/` as `sae.safetensors` + `meta.json` (atomic writes). Later loads read only that
cache: neither torch nor sae-lens is imported.

What is unpickled: a local folder is read as safetensors only. sae-lens's registry loaders for a few
releases (qwen_scope, dictionary_learning_1, connor_rob_hook_z, goodfire, deepseek_r1) read PyTorch
pickles (.pt) with torch.load; while sae-lens loads, torch is forced to its weights-only unpickler
(TORCH_FORCE_WEIGHTS_ONLY_LOAD), which rebuilds tensors and plain containers (dict, list, str, numbers)
and refuses any other class or function, so a checkpoint that names one is refused in one line and
runs no code. The other loaders read safetensors, or npz with pickles disabled (numpy's default).

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

Where the SAE ships its latents' firing densities (sae-lens's `sparsity.safetensors`: log10 of the
fraction of tokens each latent fires on), they are cached too (`load_sae_with_density`): they say which
latents are dead.

`SAEParams` is a registered pytree: the arrays are its leaves, everything else is static (part of
the treedef), so it can be passed straight into jitted functions.

Shapes: D d_in (the decoder's `_D` is d_out wide: d_in for an SAE, the output hook's width for a
transcoder), S d_sae, F selected features, K the TopK k; `...` any leading batch dimensions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui import paths
from epo_tui.atomic import write_bytes_atomic, write_json_atomic
from epo_tui.config import SAEConfig
from epo_tui.engine.hf_checkpoint import hub_offline
from epo_tui.engine.sae_hub import cached_shapes_first
from epo_tui.errors import ConfigError, UserError, did_you_mean, first_line
from epo_tui.text import inert

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

CACHE_FORMAT = 4  # bump when the cached arrays or meta.json change meaning
WEIGHTS_FILE = "sae.safetensors"
META_FILE = "meta.json"
SAE_LENS_CFG = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAE_LENS_WEIGHTS = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
SAE_LENS_SPARSITY = "sparsity.safetensors"  # sae_lens.constants.SPARSITY_FILENAME, key "sparsity"
DENSITY_FIELD = "log10_density_S"  # in our cache, beside ARRAY_FIELDS, when the SAE has one
# torch reads these at every torch.load call: force its weights-only unpickler while sae-lens loads
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
PRETRAINED_LIST_URL = "https://decoderesearch.github.io/SAELens/latest/pretrained_saes/"


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


# ----------------------------------------------------------------------------------------------
# Loading and the cache


def load_sae(sae_cfg: SAEConfig, cache_root: Path | None = None, source: str = "config") -> SAEParams:
    """The SAE named by the config (sae.release + sae.id, or sae.path), from our cache when there."""
    return load_sae_with_density(sae_cfg, cache_root, source)[0]


def load_sae_with_density(sae_cfg: SAEConfig, cache_root: Path | None = None,
                          source: str = "config") -> tuple[SAEParams, np.ndarray | None]:
    """(the SAE, log10 firing density per latent `_S` or None when the SAE ships none)."""
    root = Path(cache_root) if cache_root is not None else paths.cache_dir()
    key = _cache_key(sae_cfg, source)
    entry = root / "saes" / key
    cached = _read_cache(entry)
    if cached is None:
        arrays, meta = _load_with_sae_lens(sae_cfg, source)
        meta["cache_key"] = key
        _write_cache(entry, arrays, meta)
        cached = _params(arrays, meta), arrays.get(DENSITY_FIELD)
    sae = cached[0]
    if sae.normalize_activations in UNFOLDED:
        warnings.warn(f"sae '{sae.display_name}': normalize_activations='{sae.normalize_activations}', but its "
                      "statistics are not folded into the weights, so the raw activations are encoded, as sae-lens's "
                      "encode does (sae-lens folds a norm scaling factor its registry knows)", stacklevel=2)
    return cached


def _cache_key(sae_cfg: SAEConfig, source: str) -> str:
    if sae_cfg.path is not None:
        folder = _local_folder(sae_cfg.path, source)
        stats = [folder.resolve()]
        optional = [SAE_LENS_SPARSITY] if (folder / SAE_LENS_SPARSITY).is_file() else []
        for name in (SAE_LENS_WEIGHTS, SAE_LENS_CFG, *optional):
            st = (folder / name).stat()
            stats += [st.st_size, st.st_mtime_ns]
        return f"local-{_slug(folder.resolve().name)}-{_digest(*stats)}"
    if not sae_cfg.release:
        raise ConfigError(source, "sae", "give sae.release + sae.id, or sae.path")
    if not sae_cfg.id:
        raise ConfigError(source, "sae.id", f"missing; sae.release '{sae_cfg.release}' needs sae.id too")
    return f"{_slug(sae_cfg.release)}__{_slug(sae_cfg.id)}-{_digest(sae_cfg.release, sae_cfg.id)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "sae"


def _digest(*parts: Any) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def _local_folder(path: str, source: str) -> Path:
    folder = paths.expand_user(path)
    if not folder.is_dir():
        raise ConfigError(source, "sae.path", f"'{path}' is not a folder")
    missing = [name for name in (SAE_LENS_CFG, SAE_LENS_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(source, "sae.path",
                          f"'{path}' is not a sae-lens SAE folder (no {' or '.join(missing)} there)")
    return folder


def _read_cache(entry: Path) -> tuple[SAEParams, np.ndarray | None] | None:
    """(the cached SAE, its densities or None), or None when the entry is missing, stale or corrupt (it
    is then rebuilt)."""
    from safetensors import safe_open

    try:
        meta = json.loads((entry / META_FILE).read_text())
        weights = entry / WEIGHTS_FILE
        if meta.get("format") != CACHE_FORMAT or weights.stat().st_size != meta["weights_bytes"]:
            return None
        with safe_open(weights, framework="flax") as handle:
            names = [*ARRAY_FIELDS, *(n for n in GATED_FIELDS if n in handle.keys())]
            arrays = {name: handle.get_tensor(name) for name in names}
            density = np.asarray(handle.get_tensor(DENSITY_FIELD)) if DENSITY_FIELD in handle.keys() else None
        return _params(arrays, meta), density
    except Exception:  # noqa: BLE001 - anything wrong with a cache entry means: rebuild it
        return None


def _write_cache(entry: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Weights, then meta.json (which names the weights' size), each written atomically."""
    from safetensors.numpy import save

    try:
        data = save({name: np.ascontiguousarray(arrays[name])
                     for name in (*ARRAY_FIELDS, *GATED_FIELDS, DENSITY_FIELD) if name in arrays})
        meta["weights_bytes"] = len(data)
        write_bytes_atomic(entry / WEIGHTS_FILE, data)
        write_json_atomic(entry / META_FILE, meta)
    except OSError as err:  # the SAE is still usable; it will be converted again next time
        warnings.warn(f"could not cache the converted SAE in {entry}: {err}", stacklevel=3)


def _params(arrays: dict[str, Any], meta: dict[str, Any]) -> SAEParams:
    d_in, d_sae = meta["d_in"], meta["d_sae"]
    d_out = meta.get("d_out") or d_in
    shapes = {"W_enc_DxS": (d_in, d_sae), "b_enc_S": (d_sae,), "W_dec_SxD": (d_sae, d_out),
              "b_dec_D": (d_out,), "threshold_S": (d_sae,)}
    gated = ARCHITECTURES[meta["architecture"]][1] == "gated"
    names = ARRAY_FIELDS + (GATED_FIELDS if gated else ())
    shapes.update({name: (d_sae,) for name in GATED_FIELDS})
    for name in names:
        if tuple(arrays[name].shape) != shapes[name]:
            raise ValueError(f"{name} has shape {tuple(arrays[name].shape)}, expected {shapes[name]}")
    static = {name: meta.get(name) for name in META_FIELDS}
    return SAEParams(**{name: jnp.asarray(arrays[name], dtype=meta["dtype"]) for name in names}, **static)


def _load_with_sae_lens(sae_cfg: SAEConfig, source: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """sae-lens loads (and folds); we keep plain float32 arrays and the metadata we need."""
    from sae_lens import SAE

    lookup = None
    with warnings.catch_warnings(), _weights_only_unpickling():  # warnings: kwargs advice, deprecations
        warnings.simplefilter("ignore")
        if sae_cfg.path is not None:
            folder = _local_folder(sae_cfg.path, source)
            architecture = _local_architecture(folder, sae_cfg.path)
            try:
                if architecture in TRAINING_ONLY:
                    sae = _as_inference(_training_class().load_from_disk(folder, device="cpu", dtype="float32"))
                else:
                    sae = SAE.load_from_disk(folder, device="cpu", dtype="float32")
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - sae-lens raises many kinds for a bad folder
                raise ConfigError(source, "sae.path",
                                  f"sae-lens cannot load '{sae_cfg.path}': {first_line(err)}") from None
            density = _read_local_density(folder / SAE_LENS_SPARSITY)  # load_from_disk does not read it
        else:
            lookup = _registry_lookup(sae_cfg.release, sae_cfg.id, source)
            try:
                with cached_shapes_first():
                    sae, density = _from_pretrained(sae_cfg.release, sae_cfg.id)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001
                raise _download_error(sae_cfg.release, sae_cfg.id, err) from None
            density = None if density is None else density.detach().float().cpu().numpy()
    arrays, meta = _convert(sae, sae_cfg, lookup)
    if density is not None and density.shape == (meta["d_sae"],) and np.isfinite(density).all():
        arrays[DENSITY_FIELD] = density.astype(np.float32)  # anything else: liveness stays unknown
    return arrays, meta


@contextlib.contextmanager
def _weights_only_unpickling():
    """Every torch.load inside runs torch's weights-only unpickler, whatever its caller passes: torch
    reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call, and it wins over a caller asking for full
    unpickling. The opposite variable is lifted meanwhile (torch refuses both at once). The environment
    is restored after."""
    saved = {name: os.environ.get(name) for name in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(FORCE_NO_WEIGHTS_ONLY, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _local_architecture(folder: Path, path: str) -> str | None:
    """The architecture cfg.json names (None: sae-lens's default), refused here when we cannot run it."""
    try:
        architecture = json.loads((folder / SAE_LENS_CFG).read_text()).get("architecture")
    except (OSError, ValueError, AttributeError):
        return None  # sae-lens reports what is wrong with the file
    if architecture is not None:
        _check_architecture(str(architecture), f"sae '{path}'")
    return architecture


def _check_architecture(architecture: str, where: str) -> None:
    if architecture in SUPPORTED:
        return
    why = UNSUPPORTED_WHY.get(architecture)
    reason = f": {why}" if why else did_you_mean(architecture, SUPPORTED)
    raise UserError(f"{where}: architecture '{architecture}' is not supported{reason} "
                    f"(supported: {', '.join(SUPPORTED)})")


def _training_class():
    from sae_lens.saes.sae import TrainingSAE

    return TrainingSAE


def _from_pretrained(release: str, sae_id: str):
    """(sae, log10 densities or None) from sae-lens's registry; a training-only architecture (batchtopk)
    is loaded as sae-lens trains it, then turned into what it saves for inference."""
    from sae_lens import SAE

    try:
        sae, _, density = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id, device="cpu", dtype="float32")
        return sae, density
    except KeyError as err:  # sae-lens's inference registry has no training-only architecture
        if not err.args or err.args[0] not in TRAINING_ONLY:
            raise
    sae, _, density = _training_class().from_pretrained_with_cfg_and_sparsity(release, sae_id, device="cpu",
                                                                            dtype="float32")
    return _as_inference(sae), density


def _as_inference(training_sae):
    """What sae-lens saves a training SAE as (save_inference_model: batchtopk kinds become JumpReLU with
    the batch threshold for every latent, decoder norms folded), loaded back as sae-lens loads it."""
    from sae_lens import SAE

    with tempfile.TemporaryDirectory(prefix="epo-tui-sae-") as folder:
        training_sae.save_inference_model(folder)
        return SAE.load_from_disk(folder, device="cpu", dtype="float32")


def _read_local_density(path: Path) -> np.ndarray | None:
    """The folder's sparsity file (log10 densities), or None when it has none or it cannot be read."""
    from safetensors.numpy import load_file

    if not path.is_file():
        return None
    try:
        return load_file(path).get("sparsity")
    except Exception:  # noqa: BLE001 - optional metadata: a damaged file only means liveness is unknown
        return None


def _registry_lookup(release: str, sae_id: str, source: str):
    """The registry entry of the release (None for a Hugging Face repo id), or a ConfigError."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        if "/" in release:  # sae-lens also accepts a Hugging Face repo id as the release
            return None
        raise ConfigError(source, "sae.release", f"'{release}' is not a sae-lens release"
                          f"{did_you_mean(release, directory)} (the list: {PRETRAINED_LIST_URL})")
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        raise ConfigError(source, "sae.id", f"'{sae_id}' is not an SAE of release '{release}'"
                          f"{did_you_mean(sae_id, ids)} ({len(ids)} ids, e.g. '{ids[0]}')")
    return lookup


def _download_error(release: str, sae_id: str, err: Exception) -> UserError:
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    if type(err).__name__ == "UnpicklingError":  # torch's weights-only unpickler refused the checkpoint
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        what = f"names {inert(named.group(1))}" if named else "holds more than tensors"
        return UserError(f"sae: '{release}' / '{sae_id}' is a PyTorch pickle that {what}; epo-tui unpickles "
                         "checkpoints only with torch's weights-only loader (tensors and plain containers), "
                         "so it is refused")
    offline = hub_offline()
    if isinstance(err, GatedRepoError):
        reason = "it is gated: accept its licence on huggingface.co and set HF_TOKEN"
    elif isinstance(err, RepositoryNotFoundError):
        reason = "its repository is not on the hub (or it is private: set HF_TOKEN)"
    elif isinstance(err, LocalEntryNotFoundError):
        reason = ("it is not in the local cache and HF_HUB_OFFLINE is set" if offline
                  else "it is not in the local cache and the hub could not be reached")
    elif isinstance(err, EntryNotFoundError):
        reason = "a file of it is missing from its repository"
    elif isinstance(err, OSError):
        reason = f"could not download it ({first_line(err)})"
    else:
        return UserError(f"sae: sae-lens cannot load '{release}' / '{sae_id}': {first_line(err)}")
    return UserError(
        f"sae: cannot load '{release}' / '{sae_id}' from the Hugging Face hub or its local cache: {reason}. "
        "Set sae.path to a local sae-lens folder, or set HF_TOKEN for gated or private SAEs"
    )


# sae-lens loaders of SAEs trained on the transformers model itself (dictionary_learning reads nnsight's
# wrapper of AutoModelForCausalLM), whose configs name no model class: no TransformerLens processing
TRANSFORMERS_TRAINED_LOADERS = frozenset({"dictionary_learning_1"})


def _model_class_of_loader(lookup) -> str | None:
    """The model class an SAE's activations came from, where its sae-lens loader implies one."""
    if lookup is not None and lookup.conversion_func in TRANSFORMERS_TRAINED_LOADERS:
        return "AutoModelForCausalLM"
    return None


def _convert(sae, sae_cfg: SAEConfig, lookup) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A sae-lens SAE (already folded by from_pretrained) -> float32 arrays + meta.json content."""
    import sae_lens

    cfg = sae.cfg
    where = f"sae '{sae_cfg.path or f'{sae_cfg.release} / {sae_cfg.id}'}'"
    architecture = cfg.architecture()
    _check_architecture(architecture, where)
    kind, activation = ARCHITECTURES[architecture]
    if cfg.reshape_activations not in ("none", "hook_z"):
        raise UserError(f"{where}: reshape_activations='{cfg.reshape_activations}' is not supported"
                        " (supported: none, hook_z)")
    if cfg.normalize_activations not in NORMALIZATIONS + UNFOLDED:
        raise UserError(f"{where}: normalize_activations='{cfg.normalize_activations}' is not supported"
                        f" (supported: {', '.join(NORMALIZATIONS + UNFOLDED)})")
    metadata = cfg.metadata
    hook_name = metadata.hook_name
    if not hook_name:
        raise UserError(f"{where}: its config names no hook (metadata.hook_name)")
    if metadata.hook_head_index is not None:
        raise UserError(f"{where}: SAEs on a single attention head (hook_head_index) are not supported")
    d_in, d_sae = int(cfg.d_in), int(cfg.d_sae)
    k = int(cfg.k) if activation in ("topk", "abstopk") else 0
    if activation in ("topk", "abstopk") and not 0 < k <= d_sae:
        raise UserError(f"{where}: k = {k} must be in 1..d_sae ({d_sae})")
    if activation in ("topk", "abstopk") and cfg.rescale_acts_by_decoder_norm:
        # sae-lens's own fold: W_enc and b_enc times the decoder norms, W_dec normalized, so the top k
        # are chosen from plain pre-activations with identical results
        sae.fold_W_dec_norm()

    state = {name: tensor.detach().float().cpu().numpy() for name, tensor in sae.state_dict().items()}
    arrays = {
        "W_enc_DxS": state["W_enc"], "b_enc_S": state["b_mag" if activation == "gated" else "b_enc"],
        "W_dec_SxD": state["W_dec"], "b_dec_D": state["b_dec"],
        "threshold_S": state["threshold"] if activation == "jumprelu" else np.zeros(d_sae, np.float32),
    }
    if activation == "gated":
        arrays["b_gate_S"] = state["b_gate"]
        arrays["mag_scale_S"] = sae.r_mag.detach().float().exp().cpu().numpy()  # as sae-lens computes it
    kwargs = dict(metadata.model_from_pretrained_kwargs or {})
    overrides = (lookup.config_overrides or {}) if lookup is not None else {}
    kwargs.update(overrides.get("model_from_pretrained_kwargs") or {})  # sae-lens applies these last too
    center = kwargs.get("center_writing_weights")
    neuronpedia_id = lookup.neuronpedia_id.get(sae_cfg.id) if lookup is not None else None
    meta = {
        "format": CACHE_FORMAT,
        "architecture": architecture,
        "kind": kind,
        "k": k,
        # sae-lens's transcoders never subtract b_dec (it is d_out wide)
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input) and kind == "sae",
        "normalize_activations": cfg.normalize_activations,
        "hook_name": hook_name,
        "hook_name_out": metadata.hook_name_out,
        "hf_hook_name": metadata.hf_hook_name,
        "hf_hook_name_out": metadata.hf_hook_name_out,
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": int(state["W_dec"].shape[1]),
        "dtype": "float32",
        "center_writes": None if center is None else bool(center),
        "release": sae_cfg.release if sae_cfg.path is None else None,
        "id": sae_cfg.id if sae_cfg.path is None else None,
        "path": str(sae_cfg.path) if sae_cfg.path is not None else None,
        "neuronpedia_id": neuronpedia_id or metadata.neuronpedia_id,
        "model_name": metadata.model_name,
        "model_class_name": metadata.model_class_name or _model_class_of_loader(lookup),
        "sae_lens_version": sae_lens.__version__,
    }
    return arrays, meta

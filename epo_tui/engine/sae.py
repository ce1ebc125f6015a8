"""SAEs: loaded once through sae-lens, cached as plain arrays, encoded in pure JAX.

`load_sae` asks sae-lens (`SAE.from_pretrained` for a registry release, `SAE.load_from_disk` for a
local folder), folds what sae-lens folds (the `expected_average_only_in` norm scaling factor in
from_pretrained; TopK decoder norms when `rescale_acts_by_decoder_norm`), and caches the arrays under
`<cache>/saes/<key>/` as `sae.safetensors` + `meta.json` (atomic writes). Later loads read only that
cache: neither torch nor sae-lens is imported. Only safetensors are read (nothing is unpickled).

Where the SAE ships its latents' firing densities (sae-lens's `sparsity.safetensors`: log10 of the
fraction of tokens each latent fires on), they are cached too (`load_sae_with_density`): they say which
latents are dead.

`SAEParams` is a registered pytree: the arrays are its leaves, everything else is static (part of
the treedef), so it can be passed straight into jitted functions.

Shapes: D d_in, S d_sae, F selected features, K the TopK k; `...` any leading batch dimensions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
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
from epo_tui.engine.checkpoint import hub_offline
from epo_tui.engine.sae_hub import cached_shapes_first
from epo_tui.errors import ConfigError, UserError, did_you_mean, first_line

ARCHITECTURES = ("standard", "jumprelu", "topk")
# Run-time input normalizations we replicate (sae-lens SAE._setup_activation_normalization).
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # sae-lens run_time_activation_ln_in's default eps

CACHE_FORMAT = 4  # bump when the cached arrays or meta.json change meaning
WEIGHTS_FILE = "sae.safetensors"
META_FILE = "meta.json"
SAE_LENS_CFG = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAE_LENS_WEIGHTS = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
SAE_LENS_SPARSITY = "sparsity.safetensors"  # sae_lens.constants.SPARSITY_FILENAME, key "sparsity"
DENSITY_FIELD = "log10_density_S"  # in our cache, beside ARRAY_FIELDS, when the SAE has one
# sae-lens conversion loaders that torch.load pickles: refused, since nothing is unpickled here.
# (The default loader reads safetensors; gemma_2 reads npz with pickles disabled.)
PICKLE_LOADERS = frozenset({"connor_rob_hook_z", "goodfire", "deepseek_r1", "qwen_scope",
                            "dictionary_learning_1"})
PRETRAINED_LIST_URL = "https://decoderesearch.github.io/SAELens/latest/pretrained_saes/"


@dataclass(frozen=True, eq=False)
class SAEParams:
    """An SAE as plain arrays (float32) plus what is needed to run and describe it."""

    W_enc_DxS: jax.Array
    b_enc_S: jax.Array
    W_dec_SxD: jax.Array
    b_dec_D: jax.Array
    threshold_S: jax.Array  # JumpReLU thresholds; zeros for other architectures
    architecture: str  # standard | jumprelu | topk
    k: int  # TopK's k; 0 for other architectures
    apply_b_dec_to_input: bool
    normalize_activations: str  # none | constant_norm_rescale | layer_norm (applied at run time)
    hook_name: str  # sae-lens name, e.g. blocks.8.hook_resid_pre
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
    # the transformers module the SAE reads (sae-lens metadata.hf_hook_name, e.g. model.layers.12.output):
    # where given, its exact activation is read, with no TransformerLens processing
    hf_hook_name: str | None = None

    @property
    def read_hook(self) -> str:
        """The hook the latents read: the transformers module where the config names one, else hook_name."""
        return self.hf_hook_name or self.hook_name

    @property
    def display_name(self) -> str:
        return self.path if self.path else f"{self.release} / {self.id}"


ARRAY_FIELDS = ("W_enc_DxS", "b_enc_S", "W_dec_SxD", "b_dec_D", "threshold_S")
META_FIELDS = tuple(f.name for f in dataclasses.fields(SAEParams) if f.name not in ARRAY_FIELDS)
jax.tree_util.register_dataclass(SAEParams, data_fields=list(ARRAY_FIELDS), meta_fields=list(META_FIELDS))


# ----------------------------------------------------------------------------------------------
# Encoding (pure JAX; call inside jit freely)


def process_input(sae: SAEParams, x_xD: jax.Array) -> jax.Array:
    """sae-lens `process_sae_in`: cast, run-time normalization, then minus b_dec if apply_b_dec_to_input."""
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


def pre_activations(sae: SAEParams, x_xD: jax.Array) -> jax.Array:
    """hidden_pre ...xS: process_input(x) @ W_enc + b_enc (sae-lens hook_sae_acts_pre)."""
    return process_input(sae, x_xD) @ sae.W_enc_DxS + sae.b_enc_S


def activations_from_pre(sae: SAEParams, pre_xS: jax.Array) -> jax.Array:
    """Feature activations ...xS from all pre-activations, as sae-lens `encode` computes them."""
    if sae.architecture == "topk":
        # torch.topk over latents, ReLU on the k chosen values, zeros elsewhere
        values_xK, chosen_xK = jax.lax.top_k(pre_xS, sae.k)
        return jnp.put_along_axis(jnp.zeros_like(pre_xS), chosen_xK, jax.nn.relu(values_xK),
                                  axis=-1, inplace=False)
    return _elementwise_activation(sae, pre_xS, sae.threshold_S)


def activations(sae: SAEParams, x_xD: jax.Array) -> jax.Array:
    """Feature activations ...xS for inputs ...xD (sae-lens `encode`)."""
    return activations_from_pre(sae, pre_activations(sae, x_xD))


def feature_pre_and_act(sae: SAEParams, x_xD: jax.Array, index_or_indices) -> tuple[jax.Array, jax.Array]:
    """(pre-activation, activation) of the selected latents only: shapes ... for one index, ...xF for F.

    Standard and JumpReLU compute just the selected encoder columns. TopK needs every latent's
    pre-activation to know whether a selected latent is among the k largest, so it computes them all.
    """
    index = jnp.asarray(index_or_indices, dtype=jnp.int32)
    index_F = jnp.atleast_1d(index)
    x_xD = process_input(sae, x_xD)
    if sae.architecture == "topk":
        pre_xS = x_xD @ sae.W_enc_DxS + sae.b_enc_S
        pre_xF = jnp.take(pre_xS, index_F, axis=-1)
        _, chosen_xK = jax.lax.top_k(pre_xS, sae.k)
        in_top_xF = (chosen_xK[..., :, None] == index_F).any(axis=-2)
        act_xF = jnp.where(in_top_xF, jax.nn.relu(pre_xF), 0.0).astype(pre_xF.dtype)
    else:
        pre_xF = x_xD @ sae.W_enc_DxS[:, index_F] + sae.b_enc_S[index_F]
        act_xF = _elementwise_activation(sae, pre_xF, sae.threshold_S[index_F])
    if index.ndim == 0:
        return pre_xF[..., 0], act_xF[..., 0]
    return pre_xF, act_xF


def _elementwise_activation(sae: SAEParams, pre: jax.Array, threshold: jax.Array) -> jax.Array:
    """Standard: ReLU. JumpReLU: ReLU(h) * (h > threshold), as sae-lens JumpReLUSAE.encode."""
    if sae.architecture == "jumprelu":
        return jax.nn.relu(pre) * (pre > threshold).astype(pre.dtype)
    return jax.nn.relu(pre)


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
    if cached is not None:
        return cached
    arrays, meta = _load_with_sae_lens(sae_cfg, source)
    meta["cache_key"] = key
    _write_cache(entry, arrays, meta)
    return _params(arrays, meta), arrays.get(DENSITY_FIELD)


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
            arrays = {name: handle.get_tensor(name) for name in ARRAY_FIELDS}
            density = np.asarray(handle.get_tensor(DENSITY_FIELD)) if DENSITY_FIELD in handle.keys() else None
        return _params(arrays, meta), density
    except Exception:  # noqa: BLE001 - anything wrong with a cache entry means: rebuild it
        return None


def _write_cache(entry: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Weights, then meta.json (which names the weights' size), each written atomically."""
    from safetensors.numpy import save

    try:
        data = save({name: np.ascontiguousarray(arrays[name]) for name in (*ARRAY_FIELDS, DENSITY_FIELD)
                     if name in arrays})
        meta["weights_bytes"] = len(data)
        write_bytes_atomic(entry / WEIGHTS_FILE, data)
        write_json_atomic(entry / META_FILE, meta)
    except OSError as err:  # the SAE is still usable; it will be converted again next time
        warnings.warn(f"could not cache the converted SAE in {entry}: {err}", stacklevel=3)


def _params(arrays: dict[str, Any], meta: dict[str, Any]) -> SAEParams:
    d_in, d_sae = meta["d_in"], meta["d_sae"]
    shapes = {"W_enc_DxS": (d_in, d_sae), "b_enc_S": (d_sae,), "W_dec_SxD": (d_sae, d_in),
              "b_dec_D": (d_in,), "threshold_S": (d_sae,)}
    for name, shape in shapes.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(arrays[name].shape)}, expected {shape}")
    static = {name: meta.get(name) for name in META_FIELDS}
    return SAEParams(**{name: jnp.asarray(arrays[name], dtype=meta["dtype"]) for name in ARRAY_FIELDS}, **static)


def _load_with_sae_lens(sae_cfg: SAEConfig, source: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """sae-lens loads (and folds); we keep plain float32 arrays and the metadata we need."""
    from sae_lens import SAE

    lookup = None
    with warnings.catch_warnings():  # model_from_pretrained_kwargs advice, deprecations
        warnings.simplefilter("ignore")
        if sae_cfg.path is not None:
            folder = _local_folder(sae_cfg.path, source)
            try:
                sae = SAE.load_from_disk(folder, device="cpu", dtype="float32")
            except Exception as err:  # noqa: BLE001 - sae-lens raises many kinds for a bad folder
                raise ConfigError(source, "sae.path",
                                  f"sae-lens cannot load '{sae_cfg.path}': {first_line(err)}") from None
            density = _read_local_density(folder / SAE_LENS_SPARSITY)  # load_from_disk does not read it
        else:
            lookup = _registry_lookup(sae_cfg.release, sae_cfg.id, source)
            try:
                with cached_shapes_first():
                    sae, _, density = SAE.from_pretrained_with_cfg_and_sparsity(sae_cfg.release, sae_cfg.id,
                                                                                device="cpu", dtype="float32")
            except Exception as err:  # noqa: BLE001
                raise _download_error(sae_cfg.release, sae_cfg.id, err) from None
            density = None if density is None else density.detach().float().cpu().numpy()
    arrays, meta = _convert(sae, sae_cfg, lookup)
    if density is not None and density.shape == (meta["d_sae"],) and np.isfinite(density).all():
        arrays[DENSITY_FIELD] = density.astype(np.float32)  # anything else: liveness stays unknown
    return arrays, meta


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
    if lookup.conversion_func in PICKLE_LOADERS:
        raise ConfigError(source, "sae.release", f"'{release}' is stored as PyTorch pickles, which epo-tui "
                          "never loads; convert it once to a sae-lens folder (SAE.save_model) and set sae.path")
    if sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        raise ConfigError(source, "sae.id", f"'{sae_id}' is not an SAE of release '{release}'"
                          f"{did_you_mean(sae_id, ids)} ({len(ids)} ids, e.g. '{ids[0]}')")
    return lookup


def _download_error(release: str, sae_id: str, err: Exception) -> UserError:
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

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


def _convert(sae, sae_cfg: SAEConfig, lookup) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A sae-lens SAE (already folded by from_pretrained) -> float32 arrays + meta.json content."""
    import sae_lens

    cfg = sae.cfg
    where = f"sae '{sae_cfg.path or f'{sae_cfg.release} / {sae_cfg.id}'}'"
    architecture = cfg.architecture()
    if architecture not in ARCHITECTURES:
        raise UserError(f"{where}: architecture '{architecture}' is not supported"
                        f" (supported: {', '.join(ARCHITECTURES)})")
    if cfg.reshape_activations != "none":
        raise UserError(f"{where}: SAEs on attention heads (reshape_activations='{cfg.reshape_activations}') "
                        "are not supported")
    if cfg.normalize_activations not in NORMALIZATIONS:
        unfolded = cfg.normalize_activations == "expected_average_only_in"
        hint = " without a known norm scaling factor to fold in" if unfolded else ""
        raise UserError(f"{where}: normalize_activations='{cfg.normalize_activations}'{hint} is not supported"
                        f" (supported: {', '.join(NORMALIZATIONS)})")
    metadata = cfg.metadata
    hook_name = metadata.hook_name
    if not hook_name:
        raise UserError(f"{where}: its config names no hook (metadata.hook_name)")
    if metadata.hook_head_index is not None:
        raise UserError(f"{where}: SAEs on a single attention head (hook_head_index) are not supported")
    if architecture == "topk" and cfg.rescale_acts_by_decoder_norm:
        # sae-lens's own fold: W_enc and b_enc times the decoder norms, W_dec normalized, so the top k
        # are chosen from plain pre-activations with identical results
        sae.fold_W_dec_norm()

    state = {name: tensor.detach().float().cpu().numpy() for name, tensor in sae.state_dict().items()}
    d_in, d_sae = cfg.d_in, cfg.d_sae
    arrays = {
        "W_enc_DxS": state["W_enc"], "b_enc_S": state["b_enc"], "W_dec_SxD": state["W_dec"],
        "b_dec_D": state["b_dec"],
        "threshold_S": state["threshold"] if architecture == "jumprelu" else np.zeros(d_sae, np.float32),
    }
    kwargs = dict(metadata.model_from_pretrained_kwargs or {})
    overrides = (lookup.config_overrides or {}) if lookup is not None else {}
    kwargs.update(overrides.get("model_from_pretrained_kwargs") or {})  # sae-lens applies these last too
    center = kwargs.get("center_writing_weights")
    neuronpedia_id = lookup.neuronpedia_id.get(sae_cfg.id) if lookup is not None else None
    meta = {
        "format": CACHE_FORMAT,
        "architecture": architecture,
        "k": int(cfg.k) if architecture == "topk" else 0,
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": cfg.normalize_activations,
        "hook_name": hook_name,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "center_writes": None if center is None else bool(center),
        "release": sae_cfg.release if sae_cfg.path is None else None,
        "id": sae_cfg.id if sae_cfg.path is None else None,
        "path": str(sae_cfg.path) if sae_cfg.path is not None else None,
        "neuronpedia_id": neuronpedia_id or metadata.neuronpedia_id,
        "model_name": metadata.model_name,
        "model_class_name": getattr(metadata, "model_class_name", None),
        "hf_hook_name": getattr(metadata, "hf_hook_name", None),
        "sae_lens_version": sae_lens.__version__,
    }
    return arrays, meta

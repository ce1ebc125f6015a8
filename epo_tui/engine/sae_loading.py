"""Loading an SAE through sae-lens, once, and our cache of it as plain arrays (sae.py runs them).

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

Where the SAE ships its latents' firing densities (sae-lens's `sparsity.safetensors`: log10 of the
fraction of tokens each latent fires on), they are cached too (`load_sae_with_density`): they say which
latents are dead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from epo_tui import paths
from epo_tui.atomic import write_bytes_atomic, write_json_atomic
from epo_tui.config import SAEConfig
from epo_tui.engine.hub_access import cache_only_if_unreachable, hub_offline
from epo_tui.engine.sae import (ARCHITECTURES, ARRAY_FIELDS, GATED_FIELDS, META_FIELDS, NORMALIZATIONS, SUPPORTED,
                                TRAINING_ONLY, UNFOLDED, UNSUPPORTED_WHY, SAEParams)
from epo_tui.engine.sae_hub import cached_shapes_first
from epo_tui.errors import ConfigError, UserError, did_you_mean, first_line
from epo_tui.text import inert

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
            cache_only_if_unreachable()
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
        unreachable = cache_only_if_unreachable()
        reason = ("it is not in the local cache and HF_HUB_OFFLINE is set" if offline
                  else f"it is not in the local cache and the hub is unreachable ({unreachable})" if unreachable
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

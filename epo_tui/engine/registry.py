"""Coverage of the installed sae-lens registry: for every release, its model, the SAE kinds it holds
and whether epo-tui loads them, decided offline (nothing is downloaded).

The registry is read through sae-lens's own reader (`get_pretrained_saes_directory`). What each entry
is comes from what sae-lens's conversion loaders (`sae_lens/loading/pretrained_sae_loaders.py`) would
make of it: `classify` mirrors them, using only what the registry holds (conversion function, repo id,
release name, SAE id and folder). What epo-tui supports is read at run time from the engine
(`models.FAMILIES`, `sae.SUPPORTED`, `hooks.BLOCK_POINTS`), so the figures
follow the code as it grows.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BF16_BYTES = 2


@dataclass(frozen=True)
class Model:
    """A model of the registry: its Hugging Face `model_type` and size."""

    model_type: str  # config.json's model_type
    params_b: float  # parameters, billions, from the model card (all of the checkpoint's weights)
    note: str = ""

    @property
    def weights_gb(self) -> float:
        """Weight memory in bfloat16, GB (1e9 bytes)."""
        return self.params_b * BF16_BYTES


# Gemma3ForConditionalGeneration: epo-tui runs the language model only, about 0.4B fewer weights
_MM = "multimodal: language model only"
_MOE = "mixture of experts"
_HYBRID = "hybrid linear attention"

# sae-lens's model names -> model type and size. Sizes are the model cards' parameter counts on
# huggingface.co (Qwen 3.5: the size in the name); the model types are those of each repo's config.json.
MODELS: dict[str, Model] = {
    "gpt2-small": Model("gpt2", 0.124),
    "pythia-70m-deduped": Model("gpt_neox", 0.0704),
    "gemma-2b": Model("gemma", 2.51),
    "gemma-2b-it": Model("gemma", 2.51),
    "gemma-2-2b": Model("gemma2", 2.61),
    "gemma-2-9b": Model("gemma2", 9.24),
    "gemma-2-9b-it": Model("gemma2", 9.24),
    "gemma-2-27b": Model("gemma2", 27.2),
    # Gemma 3 270m and 1b are text-only (Gemma3ForCausalLM, model_type gemma3_text)
    "google/gemma-3-270m": Model("gemma3_text", 0.268),
    "google/gemma-3-270m-it": Model("gemma3_text", 0.268),
    "google/gemma-3-1b-pt": Model("gemma3_text", 1.0),
    "google/gemma-3-1b-it": Model("gemma3_text", 1.0),
    "google/gemma-3-4b-pt": Model("gemma3", 4.3, _MM),
    "google/gemma-3-4b-it": Model("gemma3", 4.3, _MM),
    "google/gemma-3-12b-pt": Model("gemma3", 12.2, _MM),
    "google/gemma-3-12b-it": Model("gemma3", 12.2, _MM),
    "google/gemma-3-27b-pt": Model("gemma3", 27.4, _MM),
    "google/gemma-3-27b-it": Model("gemma3", 27.4, _MM),
    "meta-llama/Llama-3.1-8B": Model("llama", 8.03),
    "meta-llama/Llama-3.1-8B-Instruct": Model("llama", 8.03),
    "meta-llama/Meta-Llama-3-8B-Instruct": Model("llama", 8.03),
    "meta-llama/Llama-3.3-70B-Instruct": Model("llama", 70.6),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": Model("llama", 8.03),
    "mistral-7b": Model("mistral", 7.24),
    "Qwen/Qwen2.5-7B-Instruct": Model("qwen2", 7.62),
    "qwen3-0.6b": Model("qwen3", 0.6),
    "qwen3-1.7b": Model("qwen3", 1.7),
    "qwen3-4b": Model("qwen3", 4.0),
    "qwen3-8b": Model("qwen3", 8.2),
    "qwen3-14b": Model("qwen3", 14.8),
    "Qwen/Qwen3-1.7B-Base": Model("qwen3", 1.7),
    "Qwen/Qwen3-8B-Base": Model("qwen3", 8.2),
    "Qwen/Qwen3-30B-A3B-Base": Model("qwen3_moe", 30.5, _MOE),
    "Qwen/Qwen3.5-2B-Base": Model("qwen3_5", 2.0, _HYBRID),
    "Qwen/Qwen3.5-9B-Base": Model("qwen3_5", 9.0, _HYBRID),
    "Qwen/Qwen3.5-27B": Model("qwen3_5", 27.0, _HYBRID),
    "Qwen/Qwen3.5-35B-A3B-Base": Model("qwen3_5_moe", 35.0, f"{_HYBRID}, {_MOE}"),
    "openai/gpt-oss-20b": Model("gpt_oss", 20.9, _MOE),
}


# ----------------------------------------------------------------------------------------------
# What kind of SAE an entry is


@dataclass(frozen=True)
class Kind:
    """One registry entry as sae-lens would load it.

    `architecture` is sae-lens's inference architecture (`cfg.architecture()`): BatchTopK and Matryoshka
    SAEs load as `jumprelu`, so their training method is kept in `trained_as`. `hook` is the
    TransformerLens hook point inside block L (`hook_resid_post`, `attn.hook_z`, ...) or a model-level
    one (`hook_embed`); None where the registry does not say. `hf_hook` is True when the SAE also names the
    transformers module it read (cfg `hf_hook_name`).
    """

    architecture: str | None
    hook: str | None
    trained_as: str | None = None
    hf_hook: bool = False

    @property
    def label(self) -> str:
        """e.g. `topk`, `batchtopk`, `jumprelu_transcoder`, `jumprelu hook_z`, `standard (p-anneal)`."""
        name = self.trained_as if self.trained_as in _TRAINED_AS_NAMES else self.architecture or "unknown"
        if self.trained_as and self.trained_as not in _TRAINED_AS_NAMES:
            name += f" ({self.trained_as})"
        if self.hook in _LABELLED_HOOKS:
            name += f" {_LABELLED_HOOKS[self.hook]}"
        return name


# training methods shown in place of the architecture they load as
_TRAINED_AS_NAMES = ("batchtopk", "matryoshka")
# hooks named in a kind's label: where the SAE does not read the residual stream or a sublayer's output
_LABELLED_HOOKS = {"attn.hook_z": "hook_z", "hook_embed": "hook_embed"}

# `blocks.8.hook_resid_pre`, `blocks.8.hook_resid_pre_768` (a width suffix), `blocks.0.hook_z`
_HOOK_ID = re.compile(r"^blocks\.\d+\.([A-Za-z0-9_.]+?)(?:_\d+)?$")


def _hook_from_id(sae_id: str) -> str | None:
    match = _HOOK_ID.match(sae_id)
    if not match:
        return None
    point = match.group(1)
    return "attn.hook_z" if point == "hook_z" else point


def _layer_hook(name: str | None) -> str | None:
    """`blocks.12.hook_resid_post` -> `hook_resid_post`; a name outside the blocks stays as it is."""
    if name is None:
        return None
    match = re.match(r"^blocks\.\d+\.(.+)$", name)
    return match.group(1) if match else name


# One function per sae-lens conversion function; each reads what that loader reads (see
# pretrained_sae_loaders.py, named in each docstring) from the registry entry alone.
Classifier = Callable[[Any, str, str], Kind]


def _sae_lens(lookup, sae_id: str, path: str) -> Kind:
    """sae_lens_huggingface_loader: the SAE's own cfg.json (on the hub) says; the registry's ids name
    the hook. OpenAI's v5 GPT-2 SAEs are TopK (k=32); chanind's Matryoshka BatchTopK SAEs are saved,
    as sae-lens saves every BatchTopK SAE for inference, as JumpReLU; the others are standard."""
    overrides = lookup.config_overrides or {}
    hook = _layer_hook(overrides.get("hook_name")) or _hook_from_id(sae_id)
    names = f"{lookup.release} {lookup.repo_id}".lower()
    if "architecture" in overrides:
        return Kind(overrides["architecture"], hook)
    if "oai-v5" in names:
        return Kind("topk", hook)
    if "matryoshka" in names:
        return Kind("jumprelu", hook, "matryoshka")
    return Kind("standard", hook)


def _gemma_2(lookup, sae_id: str, path: str) -> Kind:
    """get_gemma_2_config_from_hf: JumpReLU; the hook from the repo id (res / mlp / att) and the
    folder (`embedding/...` reads hook_embed); att SAEs read attn.hook_z."""
    repo = lookup.repo_id
    if "res" in repo:
        hook = "hook_embed" if "embedding" in path else "hook_resid_post"
    elif "mlp" in repo:
        hook = "hook_mlp_out"
    elif "att" in repo:
        hook = "attn.hook_z"
    else:
        hook = None
    return Kind("jumprelu", hook)


def _gemma_3(lookup, sae_id: str, path: str) -> Kind:
    """get_gemma_3_config_from_hf (Gemma Scope 2): JumpReLU, with the transformers module named too;
    by folder: resid_post, attn_out (attn.hook_z: o_proj's input), mlp_out, or transcoder / clt
    (hook_mlp_in -> hook_mlp_out; `affine` in the folder: a skip transcoder)."""
    if "transcoder" in path or "clt" in path:
        skip = "affine" in path
        return Kind("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder", "hook_mlp_in", hf_hook=True)
    for folder, hook in (("resid_post", "hook_resid_post"), ("attn_out", "attn.hook_z"),
                         ("mlp_out", "hook_mlp_out")):
        if folder in path:
            return Kind("jumprelu", hook, hf_hook=True)
    return Kind("jumprelu", None, hf_hook=True)


def _llama_scope(lookup, sae_id: str, path: str) -> Kind:
    """get_llama_scope_config_from_hf: JumpReLU (a scalar threshold); the hook from hyperparams.json,
    which the folder's L{layer}{R|A|M} names: resid_post, attn_out, mlp_out. Its input norm
    (expected_average_only_in) is folded with the registry's norm_scaling_factor."""
    match = re.search(r"L\d+([RAM])\b", path)
    hook = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out"}.get(match.group(1)) if match else None
    return Kind("jumprelu", hook)


def _llama_scope_r1_distill(lookup, sae_id: str, path: str) -> Kind:
    """get_llama_scope_r1_distill_config_from_hf: JumpReLU; folders `.../L{layer}R`: resid_post."""
    return Kind("jumprelu", "hook_resid_post" if re.search(r"L\d+R$", path) else None)


def _dictionary_learning_1(lookup, sae_id: str, path: str) -> Kind:
    """get_dictionary_learning_config_1_from_hf: resid_post; the architecture from the trainer's
    dict_class in config.json (on the hub), which the release and folder names say: TopK -> topk;
    BatchTopK and Matryoshka BatchTopK -> jumprelu; gated -> gated; vanilla / standard / p-anneal ->
    standard. andyrdt's SAEs are BatchTopK (their model cards say so)."""
    names = f"{lookup.release} {path}".lower()
    hook = "hook_resid_post"
    if "matryoshka" in names:
        return Kind("jumprelu", hook, "matryoshka")
    if "batchtopk" in names or "batch_top_k" in names or "andyrdt" in lookup.repo_id.lower():
        return Kind("jumprelu", hook, "batchtopk")
    if "topk" in names:
        return Kind("topk", hook)
    if "gated" in names:
        return Kind("gated", hook)
    if "panneal" in names:
        return Kind("standard", hook, "p-anneal")
    if "vanilla" in names or "standard" in names:
        return Kind("standard", hook)
    return Kind(None, hook)


def _qwen_scope(lookup, sae_id: str, path: str) -> Kind:
    """get_qwen_scope_config_from_hf: TopK on resid_post, naming model.layers.L too."""
    return Kind("topk", "hook_resid_post", hf_hook=True)


def _gemma_2_transcoder(lookup, sae_id: str, path: str) -> Kind:
    """get_gemma_2_transcoder_config_from_hf: JumpReLU transcoder, ln2.hook_normalized -> hook_mlp_out."""
    return Kind("jumprelu_transcoder", "ln2.hook_normalized")


def _mwhanna_transcoder(lookup, sae_id: str, path: str) -> Kind:
    """get_mwhanna_transcoder_config_from_hf: ReLU transcoder, mlp.hook_in (the MLP's input, after
    its norm: TransformerLens's bridge name) -> hook_mlp_out."""
    return Kind("transcoder", "mlp.hook_in")


def _mntss_clt(lookup, sae_id: str, path: str) -> Kind:
    """mntss_clt_layer_huggingface_loader: one layer of a cross-layer transcoder as a ReLU transcoder
    (its decoders summed; the latents are the encoder's). The hook comes from the repo's config.yaml;
    circuit-tracer's CLTs read hook_resid_mid (assumed here: it cannot be read offline)."""
    return Kind("transcoder", "hook_resid_mid", "cross-layer")


def _temporal(lookup, sae_id: str, path: str) -> Kind:
    """get_temporal_sae_config_from_hf: a temporal SAE (attention over earlier tokens' codes)."""
    overrides = lookup.config_overrides or {}
    return Kind("temporal", _layer_hook(overrides.get("hook_name")) or _hook_from_id(sae_id))


def _resid_post_standard(lookup, sae_id: str, path: str) -> Kind:
    """goodfire / deepseek_r1 configs: a standard SAE on resid_post (blocks.L named in the id or file)."""
    return Kind("standard", "hook_resid_post")


def _connor_rob_hook_z(lookup, sae_id: str, path: str) -> Kind:
    """get_connor_rob_hook_z_config_from_hf: standard, on attn.hook_z (heads concatenated)."""
    return Kind("standard", "attn.hook_z")


CLASSIFIERS: dict[str, Classifier] = {
    "sae_lens": _sae_lens,
    "gemma_2": _gemma_2,
    "gemma_3": _gemma_3,
    "llama_scope": _llama_scope,
    "llama_scope_r1_distill": _llama_scope_r1_distill,
    "dictionary_learning_1": _dictionary_learning_1,
    "qwen_scope": _qwen_scope,
    "gemma_2_transcoder": _gemma_2_transcoder,
    "mwhanna_transcoder": _mwhanna_transcoder,
    "mntss_clt_layer_transcoder": _mntss_clt,
    "temporal": _temporal,
    "goodfire": _resid_post_standard,
    "deepseek_r1": _resid_post_standard,
    "connor_rob_hook_z": _connor_rob_hook_z,
}


def conversion_func(lookup) -> str:
    """The release's sae-lens loader; none named means sae-lens's own format."""
    return lookup.conversion_func or "sae_lens"


def classify(lookup, sae_id: str) -> Kind:
    """What entry `sae_id` of the release `lookup` (a sae-lens PretrainedSAELookup) is; an unknown
    conversion function gives Kind(None, None)."""
    classifier = CLASSIFIERS.get(conversion_func(lookup))
    if classifier is None:
        return Kind(None, None)
    return classifier(lookup, sae_id, lookup.saes_map[sae_id])


# ----------------------------------------------------------------------------------------------
# What epo-tui loads


@dataclass(frozen=True)
class Support:
    """What the engine loads: model types, SAE architectures, hook points."""

    model_types: frozenset[str]
    architectures: frozenset[str]
    hook_ok: Callable[[str], bool] = field(compare=False)


def current_support() -> Support:
    """Read from the engine now (other code may have grown it since import)."""
    from epo_tui.engine import models, sae

    return Support(model_types=frozenset(models.FAMILIES),
                   architectures=frozenset(getattr(sae, "SUPPORTED", ())),
                   hook_ok=_engine_hook_ok)


def _engine_hook_ok(hook: str) -> bool:
    """Whether the engine records the TransformerLens point inside a block (`hook_embed` and other
    model-level points are not recorded)."""
    from epo_tui.engine.models import hooks

    return hook in hooks.BLOCK_POINTS


UNKNOWN_MODEL = "model not in epo-tui's table"
UNKNOWN_KIND = "kind unknown offline"


def why_not(model_name: str, kind: Kind, support: Support) -> str | None:
    """None when epo-tui loads the entry, else the first reason it does not, in a few words: the
    model family, then the architecture, the hook."""
    model = MODELS.get(model_name)
    if model is None:
        return UNKNOWN_MODEL
    if model.model_type not in support.model_types:
        return f"model type {model.model_type}"
    if kind.architecture is None:
        return UNKNOWN_KIND
    if kind.architecture not in support.architectures:
        return f"architecture {kind.architecture}"
    if kind.hook is None:
        return UNKNOWN_KIND
    if not support.hook_ok(kind.hook):
        return f"hook {kind.hook}"
    return None


# ----------------------------------------------------------------------------------------------
# The report


def coverage(directory: dict | None = None, support: Support | None = None,
             release_filter: str | None = None) -> dict[str, Any]:
    """Per release (sorted by model type, model size, model, release): model, family, kinds, entries,
    loaded entries and why the others are not; then the totals. `release_filter`: a case-insensitive
    substring of the release names to keep (None: all)."""
    from epo_tui.engine import models

    directory = read_directory() if directory is None else directory
    support = current_support() if support is None else support
    names = sorted(directory)
    if release_filter is not None:
        names = [n for n in names if release_filter.lower() in n.lower()]
    releases = []
    for name in names:
        lookup = directory[name]
        loader = conversion_func(lookup)
        model = MODELS.get(lookup.model)
        kinds: Counter[Kind] = Counter(classify(lookup, sae_id) for sae_id in lookup.saes_map)
        reasons: Counter[str] = Counter()
        for kind, count in kinds.items():
            reason = why_not(lookup.model, kind, support)
            if reason is not None:
                reasons[reason] += count
        total = sum(kinds.values())
        family = models.FAMILIES.get(model.model_type) if model else None
        releases.append({
            "release": name,
            "model": lookup.model,
            "model_type": model.model_type if model else None,
            "family": family.rsplit(".", 1)[-1] if family else None,
            "params_b": model.params_b if model else None,
            "weights_gb_bf16": round(model.weights_gb, 2) if model else None,
            "model_note": model.note if model else "",
            "conversion_func": loader,
            "repo_id": lookup.repo_id,
            "saes": total,
            "loaded": total - sum(reasons.values()),
            "kinds": [{"kind": k.label, "architecture": k.architecture, "hook": k.hook,
                       "trained_as": k.trained_as, "hf_hook": k.hf_hook, "saes": n}
                      for k, n in kinds.most_common()],
            "not_loaded": dict(reasons.most_common()),
        })
    # Gemma 3's text-only sizes (gemma3_text) before its multimodal ones
    releases.sort(key=lambda r: ((r["model_type"] or "~").removesuffix("_text"), r["params_b"] or 0.0,
                                 r["model"], r["release"]))
    all_saes = sum(r["saes"] for r in releases)
    loaded = sum(r["loaded"] for r in releases)
    reasons_total: Counter[str] = Counter()
    for r in releases:
        reasons_total.update(r["not_loaded"])
    return {
        "sae_lens_version": _sae_lens_version(),
        "release_filter": release_filter,
        "supported": {"model_types": sorted(support.model_types), "architectures": sorted(support.architectures)},
        "releases": releases,
        "total": {"releases": len(releases), "saes": all_saes, "loaded": loaded,
                  "share": loaded / all_saes if all_saes else 0.0,
                  "not_loaded": dict(reasons_total.most_common())},
    }


# ----------------------------------------------------------------------------------------------
# Reading the registry


def read_directory() -> dict:
    """release -> sae-lens PretrainedSAELookup, through sae-lens's own reader.

    Importing `sae_lens.loading...` runs sae-lens's package __init__, which imports torch and
    TransformerLens (about 4 s). The reader module itself needs only yaml, so it is loaded on its own
    from the installed package, its resource lookup pointed at the package's folder. Anything
    unexpected falls back to the ordinary import.
    """
    import sys

    if "sae_lens" not in sys.modules:
        try:
            return _reader_alone().get_pretrained_saes_directory()
        except Exception:  # noqa: BLE001 - a sae-lens that changed its reader: take the slow path
            pass
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


@functools.cache  # one copy per process, so its own cache of the parsed registry holds
def _reader_alone():
    spec = importlib.util.find_spec("sae_lens")  # a top-level spec: finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("sae-lens is not installed")
    package = Path(list(spec.submodule_search_locations)[0])
    source = package / "loading" / "pretrained_saes_directory.py"
    reader_spec = importlib.util.spec_from_file_location("_epo_tui_sae_lens_registry", source)
    module = importlib.util.module_from_spec(reader_spec)
    reader_spec.loader.exec_module(module)
    module.files = lambda _package: package  # importlib.resources.files(name) would import sae_lens
    return module


def _sae_lens_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return None

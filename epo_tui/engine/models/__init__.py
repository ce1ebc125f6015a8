"""Model families, each one short pure-JAX module with the same interface:

- `Config.from_hf(hf_config)`, `params_from_checkpoint(checkpoint, cfg, n_layers)` (a
  `checkpoint.CheckpointTensors`: every tensor looked up by name and shape through it),
- `embed(params, cfg, ids_BxL | onehot_BxLxV) -> x_BxLxD`,
- `forward(params, cfg, x_BxLxD, recorder, logits) -> logits_BxLxV | None`,
- `folded_unembedding_VxD(params)`: W_U (the head as transformers ties or unties it) with the final
  norm's gain folded in,
- `hook_names(cfg) -> hooks.HookNames`: the TransformerLens points it records and its transformers
  modules mapped to them (an SAE's `hf_hook_name`),
- `CENTERS_WRITES_BY_DEFAULT`: TransformerLens's residual convention for the family,
- `transformer_lens_config(cfg)`: the config as TransformerLens runs the model,
- `Config.max_positions`: the longest sequence the model reads.

Optional: `checkpoint_filter(hf_config)`, a predicate on tensor names saying which to read (None: all),
for checkpoints that hold more than the language model (Gemma 3's vision tower).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from epo_tui.errors import UserError

# Hugging Face `model_type` -> module of ours.
FAMILIES = {
    "gpt2": "epo_tui.engine.models.gpt2",
    "gemma": "epo_tui.engine.models.gemma",
    "gemma2": "epo_tui.engine.models.gemma",
    "gemma3_text": "epo_tui.engine.models.gemma3",
    "gemma3": "epo_tui.engine.models.gemma3",
    "gpt_neox": "epo_tui.engine.models.gpt_neox",
    "llama": "epo_tui.engine.models.llama",
    "mistral": "epo_tui.engine.models.llama",
    "qwen2": "epo_tui.engine.models.llama",
    "qwen3": "epo_tui.engine.models.llama",
    "qwen3_moe": "epo_tui.engine.models.llama",
}


# Model types behind sae-lens registry entries that no family runs yet, and what they would take.
NOT_YET = {
    "qwen3_5": "Qwen 3.5 interleaves linear-attention (Gated DeltaNet) layers with full attention",
    "qwen3_5_moe": "Qwen 3.5 interleaves linear-attention (Gated DeltaNet) layers with full attention, "
                   "and its MLPs are mixtures of experts",
    "qwen3_next": "Qwen3-Next interleaves linear-attention (Gated DeltaNet) layers with full attention",
    "gpt_oss": "gpt-oss has attention sinks and a mixture of experts with its own activation",
}


def family_module(model_type: str) -> ModuleType:
    """Our module for a Hugging Face `model_type`; UserError naming config.json's model_type otherwise."""
    if model_type not in FAMILIES:
        why = f": {NOT_YET[model_type]}, which epo-tui does not run yet" if model_type in NOT_YET else ""
        raise UserError(f"config.json's model_type '{model_type}' is not supported{why} "
                        f"(supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])

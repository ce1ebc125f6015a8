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
    "llama": "epo_tui.engine.models.llama",
    "mistral": "epo_tui.engine.models.llama",
    "qwen2": "epo_tui.engine.models.llama",
    "qwen3": "epo_tui.engine.models.llama",
    "qwen3_moe": "epo_tui.engine.models.llama",
}


def family_module(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise UserError(f"model type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])

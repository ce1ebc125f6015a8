"""Finding a Hugging Face checkpoint (hub id through the huggingface_hub cache, or a local folder)
and reading its safetensors (single file or sharded index). Nothing is unpickled."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
from safetensors import SafetensorError, safe_open

from epo_tui.errors import UserError, first_line

# What a checkpoint folder must hold for us: config, tokenizer files and safetensors weights.
CHECKPOINT_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                    "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.model"]
_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")


def resolve_checkpoint_dir(name: str | None, path: str | None) -> Path:
    """A local folder as given, or the hub id's snapshot in the huggingface_hub cache (downloading it
    when the hub is reachable; HF_HUB_OFFLINE=1 uses the cache only)."""
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise UserError(f"model.path: '{path}' is not a checkpoint folder (no config.json there)")
        return folder
    assert name is not None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    offline = hub_offline()
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES))
    except GatedRepoError:
        reason = "it is gated: accept its licence on huggingface.co and export HF_TOKEN"
    except RepositoryNotFoundError:
        reason = "no such model on the hub (or it is private: export HF_TOKEN)"
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub is unreachable: {first_line(err.__cause__ or err)}"
        reason = f"it is not in the local cache and {why}"
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = f"the download failed: {first_line(err)}"
    raise UserError(
        f"model.name: cannot load '{name}' from the Hugging Face hub or its local cache ({reason}). "
        "Set model.path to a local checkpoint folder, export HF_TOKEN if the model is gated, or fill the "
        "cache where the hub is reachable"
    )


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks huggingface_hub to use its cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def read_safetensors(folder: Path, max_layer: int | None = None) -> dict[str, jnp.ndarray]:
    """All tensors of a checkpoint folder as JAX arrays, skipping layers deeper than `max_layer`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"'{folder}' holds no .safetensors weights (only safetensors are read)")
    tensors: dict[str, jnp.ndarray] = {}
    for file in files:
        try:
            with safe_open(folder / file, framework="flax") as handle:
                for key in handle.keys():
                    match = _LAYER_RE.search(key)
                    if max_layer is not None and match and int(match.group(1)) > max_layer:
                        continue
                    tensors[key] = handle.get_tensor(key)
        except (OSError, SafetensorError) as err:  # truncated, corrupt or unreadable: not our bug
            raise UserError(f"cannot read the weights in '{folder / file}': {first_line(err)}") from None
    return tensors

"""Finding a Hugging Face checkpoint (hub id through the huggingface_hub cache, or a local folder),
reading its safetensors (single file or sharded index), and looking its tensors up by the names and
shapes its config implies. Nothing is unpickled."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from safetensors import SafetensorError, safe_open

from epo_tui.engine.hub_access import cache_only_if_unreachable, hub_offline
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

    offline, unreachable = hub_offline(), cache_only_if_unreachable()
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES))
    except GatedRepoError:
        reason = "it is gated: accept its licence on huggingface.co and export HF_TOKEN"
    except RepositoryNotFoundError:
        reason = "no such model on the hub (or it is private: export HF_TOKEN)"
    except LocalEntryNotFoundError as err:
        why = ("HF_HUB_OFFLINE is set" if offline else f"the hub is unreachable: {unreachable}" if unreachable
               else f"the hub is unreachable: {first_line(err.__cause__ or err)}")
        reason = f"it is not in the local cache and {why}"
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = f"the download failed: {first_line(err)}"
    raise UserError(
        f"model.name: cannot load '{name}' from the Hugging Face hub or its local cache ({reason}). "
        "Set model.path to a local checkpoint folder, export HF_TOKEN if the model is gated, or fill the "
        "cache where the hub is reachable"
    )


def read_safetensors(folder: Path, max_layer: int | None = None,
                     keep: Callable[[str], bool] | None = None) -> dict[str, jnp.ndarray]:
    """All tensors of a checkpoint folder as JAX arrays, skipping layers deeper than `max_layer` and,
    with `keep`, every tensor whose name it refuses (never read into memory)."""
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
                    if keep is not None and not keep(key):
                        continue
                    match = _LAYER_RE.search(key)
                    if max_layer is not None and match and int(match.group(1)) > max_layer:
                        continue
                    tensors[key] = handle.get_tensor(key)
        except (OSError, SafetensorError) as err:  # truncated, corrupt or unreadable: not our bug
            raise UserError(f"cannot read the weights in '{folder / file}': {first_line(err)}") from None
    return tensors


# A tensor's expected shape: one (config key or expression, size) per axis, e.g. (("vocab_size", 320),
# ("n_embd", 32)), so a mismatch names the keys it came from.
Shape = Sequence[tuple[str, int]]


@dataclass(frozen=True)
class CheckpointTensors:
    """One checkpoint folder's tensors, looked up by the names and shapes its config implies.

    Every family's loader reads through here, so a missing or mis-shaped tensor is one UserError line
    naming the folder, the tensor and the config key that made it needed, never a KeyError.
    """

    folder: Path
    tensors: Mapping[str, jnp.ndarray]
    hf_config: Any  # the transformers config, for the values of the keys named in errors

    def setting(self, key: str) -> str:
        """`key: value` as config.json writes it (`tie_word_embeddings: false`, `n_layer: 4`)."""
        return f"{key}: {json.dumps(getattr(self.hf_config, key, None), default=str)}"

    def find(self, name: str, aliases: Sequence[str] = ()) -> str | None:
        """The first of `name`, *aliases that the checkpoint holds, or None."""
        return next((key for key in (name, *aliases) if key in self.tensors), None)

    def get(self, name: str, shape: Shape, needed_by: str, aliases: Sequence[str] = ()) -> jnp.ndarray:
        """The tensor `name` (or its first alias present), of `shape`.

        Raises UserError when neither is there (naming `name` and `needed_by`, the config key that makes
        the model need it) or when its shape is not `shape`.
        """
        key = self.find(name, aliases)
        if key is None:
            raise UserError(f"the checkpoint '{self.folder}' has no tensor '{name}', which its config needs "
                            f"({self.setting(needed_by)})")
        return self._checked(key, shape)

    def _checked(self, key: str, shape: Shape) -> jnp.ndarray:
        tensor = self.tensors[key]
        expected = tuple(size for _, size in shape)
        if tuple(tensor.shape) != expected:
            names = ", ".join(name for name, _ in shape)
            raise UserError(f"the checkpoint '{self.folder}' has tensor '{key}' of shape {_dims(tensor.shape)}, "
                            f"but its config gives ({names}) = {_dims(expected)}")
        return tensor

    def embedding_and_head(self, embed: str, embed_aliases: Sequence[str], shape: Shape,
                           head: str = "lm_head.weight") -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """(embedding_VxD, unembedding_VxD, or None where the head is the embedding), as transformers 5's
        from_pretrained ties them.

        `tie_word_embeddings: false` reads `head` on its own. Tied (the default), a checkpoint holding
        both with different values keeps both (transformers warns and unties), and one holding only
        `head` uses it for both. Raises UserError for a missing tensor (naming `tie_word_embeddings` when
        that made the head needed) or a mis-shaped one.
        """
        embed_key, head_key = self.find(embed, embed_aliases), self.find(head)
        if not getattr(self.hf_config, "tie_word_embeddings", True):
            return self.get(embed, shape, "model_type", embed_aliases), self.get(head, shape, "tie_word_embeddings")
        if embed_key is None and head_key is not None:
            return self._checked(head_key, shape), None
        embedding = self.get(embed, shape, "model_type", embed_aliases)
        if head_key is None:
            return embedding, None
        head_VxD = self._checked(head_key, shape)
        return embedding, (None if bool(jnp.array_equal(embedding, head_VxD)) else head_VxD)


def _dims(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"

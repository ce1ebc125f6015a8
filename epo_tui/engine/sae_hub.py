"""Where sae-lens's loaders would reach the hub for what the local hub cache already holds.

sae-lens's Gemma Scope 2 and cross-layer-transcoder loaders read a weights file's tensor shapes from the
hub with an HTTP range request (`get_safetensors_tensor_shapes`), even when the whole file is in the
huggingface_hub cache. On a machine without the hub (an air-gapped TPU VM, `HF_HUB_OFFLINE=1`) that
request fails, so a cached Gemma Scope 2 SAE could not be loaded. `cached_shapes_first` reads the
header of the cached file instead, and asks the hub only for a file the cache lacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def cached_tensor_shapes(repo_id: str, filename: str) -> dict[str, list[int]] | None:
    """{tensor name: shape} of `repo_id`/`filename` from its copy in the huggingface_hub cache, read
    from the safetensors header alone; None when the cache has no copy."""
    from huggingface_hub import try_to_load_from_cache
    from safetensors import safe_open

    path = try_to_load_from_cache(repo_id, filename)
    if not isinstance(path, str):
        return None
    with safe_open(path, framework="numpy") as handle:
        return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}


@contextlib.contextmanager
def cached_shapes_first() -> Iterator[None]:
    """While sae-lens loads: its loaders' shape lookups read the cached file's header when there is one."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    from_hub = loaders.get_safetensors_tensor_shapes

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        cached = cached_tensor_shapes(repo_id, filename)
        return cached if cached is not None else from_hub(repo_id, filename)

    loaders.get_safetensors_tensor_shapes = shapes
    try:
        yield
    finally:
        loaders.get_safetensors_tensor_shapes = from_hub

"""JAX's persistent compilation cache in `<cache>/jax`, so a second run skips XLA compilation.

Call `enable_compile_cache()` once at the start of a process (CLI command, worker), before anything
is compiled. Every compiled step is cached, however quick its compile: the tiny model's steps compile
in well under JAX's default 1 s threshold, yet together they are most of its start-up time.

`EPO_TUI_JAX_CACHE` overrides the folder, or turns the cache off with `off` (the benchmark uses it to
time cold and warm starts).
"""

from __future__ import annotations

import os
from pathlib import Path

from epo_tui import paths

ENV_VAR = "EPO_TUI_JAX_CACHE"
MAX_BYTES = 2 * 1024**3  # least recently used entries go beyond this


def compile_cache_dir() -> Path | None:
    """The folder in use: `EPO_TUI_JAX_CACHE`, else `<cache>/jax`; None when turned off."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override.lower() in ("off", "0", "none", "false"):
        return None
    return Path(override).expanduser() if override else paths.cache_dir() / "jax"


def enable_compile_cache(folder: Path | str | None = None) -> Path | None:
    """Turns the persistent cache on in `folder` (default `compile_cache_dir()`); returns the folder,
    or None when it is turned off or the folder cannot be created (then runs just compile)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    target = Path(folder) if folder is not None else compile_cache_dir()
    if target is None:
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    compilation_cache.reset_cache()  # takes effect even if something compiled already
    return target

"""Each SAE latent's decoder direction read through the model's unembedding: its top tokens (and its
firing density, when the SAE ships one).

The catalog is computed once per (model, SAE) in chunks with a progress bar, then cached.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.progress import Progress

from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.features import FeatureEntry, catalog_path, load_catalog, save_catalog

TOP_TOKENS = 8
CHUNK = 1024


@functools.partial(jax.jit, static_argnames=("k",))
def _top_tokens(W_dec_CxD: jnp.ndarray, W_U_VxD: jnp.ndarray, banned_V: jnp.ndarray, k: int):
    logits_CxV = jnp.einsum("CD,VD->CV", W_dec_CxD.astype(jnp.float32), W_U_VxD.astype(jnp.float32))
    return jax.lax.top_k(jnp.where(banned_V, -jnp.inf, logits_CxV), k)[1]


def compute_catalog(pair: ModelWithSAE, k: int = TOP_TOKENS, show_progress: bool = True) -> list[FeatureEntry]:
    """Each latent's top tokens: its decoder row as the residual direction it writes (through W_O for
    an attn.hook_z SAE, the down projection for mlp.hook_post; a transcoder's decoder writes its output
    hook), read through the folded unembedding. None where no linear map reaches the residual."""
    model, sae = pair.model, pair.sae
    W_dec_SxD = model.residual_rows(sae.write_hook, sae.W_dec_SxD)
    if W_dec_SxD is None:
        return _entries(pair, np.zeros((sae.d_sae, 0), np.int32))
    W_U_VxD = model.folded_unembedding_VxD()
    banned_V = jnp.zeros(W_U_VxD.shape[0], dtype=bool).at[model.special_token_ids()].set(True)
    d_sae = W_dec_SxD.shape[0]
    pad = (-d_sae) % CHUNK  # one static chunk shape: a single compilation
    W_dec_SxD = jnp.pad(W_dec_SxD, ((0, pad), (0, 0)))
    ids = []
    with Progress(console=Console(stderr=True), transient=True, disable=not show_progress) as progress:
        task = progress.add_task("top tokens per feature", total=d_sae)
        for start in range(0, d_sae, CHUNK):
            ids.append(np.asarray(_top_tokens(W_dec_SxD[start:start + CHUNK], W_U_VxD, banned_V, k)))
            progress.update(task, advance=min(CHUNK, d_sae - start))
    return _entries(pair, np.concatenate(ids)[:d_sae])


def _entries(pair: ModelWithSAE, ids_SxK: np.ndarray) -> list[FeatureEntry]:
    model = pair.model
    used = np.unique(ids_SxK)
    text_of = dict(zip(used.tolist(), model.token_strings(used)))
    density_S = pair.log10_density_S
    return [FeatureEntry(index=i, top_tokens=tuple(text_of[t] for t in row.tolist()),
                         top_token_ids=tuple(int(t) for t in row),
                         log10_density=None if density_S is None else round(float(density_S[i]), 4))
            for i, row in enumerate(ids_SxK)]


def feature_catalog(pair: ModelWithSAE) -> list[FeatureEntry]:
    """The cached catalog of this model + SAE, computed on first use."""
    key = f"{pair.model.name}|{pair.sae.cache_key}|top{TOP_TOKENS}"
    path = catalog_path(key)
    entries = load_catalog(path, key)
    if entries is None:
        entries = compute_catalog(pair)
        save_catalog(path, key, entries)
    return entries

"""The feature catalog: each SAE latent's index, top tokens, label and firing density, cached on disk,
searchable.

Plain Python (no JAX): the engine computes the top tokens once per SAE; the CLI and the UI read and
search the cached catalog.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from epo_tui import paths
from epo_tui.atomic import write_json_atomic

if TYPE_CHECKING:
    from epo_tui.labels import ImportedLabels

CATALOG_VERSION = 3  # 3: a token that is part of a UTF-8 character shows as `\xNN`, no longer U+FFFD
# sae-lens's default dead-feature threshold (a latent firing on fewer than 1 token in 10^8 is dead); its
# trainer records a latent that never fired as log10(0 + 1e-10) = -10
DEAD_BELOW_LOG10_DENSITY = -8.0


@dataclass(frozen=True)
class FeatureEntry:
    index: int
    top_tokens: tuple[str, ...]  # decoder direction through the unembedding, strongest first
    top_token_ids: tuple[int, ...]
    label: str | None = None
    log10_density: float | None = None  # log10 of the fraction of tokens it fires on; None: not recorded

    @property
    def alive(self) -> bool | None:
        """Whether it fires at all, as the SAE's own record says; None when there is no record."""
        return None if self.log10_density is None else self.log10_density >= DEAD_BELOW_LOG10_DENSITY

    def to_json(self) -> dict:
        data = asdict(self)
        data["top_tokens"], data["top_token_ids"] = list(self.top_tokens), list(self.top_token_ids)
        return data

    @classmethod
    def from_json(cls, data: dict) -> FeatureEntry:
        """An entry back from `to_json` (the catalog file, the worker's `features` event)."""
        return cls(index=data["index"], top_tokens=tuple(data["top_tokens"]),
                   top_token_ids=tuple(data["top_token_ids"]), label=data.get("label"),
                   log10_density=data.get("log10_density"))


def alive_indices(entries: list[FeatureEntry]) -> set[int] | None:
    """The latents that fire, or None when the SAE shipped no densities (every latent then counts)."""
    if all(e.log10_density is None for e in entries):
        return None
    return {e.index for e in entries if e.alive}


def catalog_path(sae_key: str, cache_root: Path | None = None) -> Path:
    """Where the catalog of the SAE identified by `sae_key` (release/id or folder + stamp) lives."""
    digest = hashlib.sha256(sae_key.encode()).hexdigest()[:16]
    return (cache_root or paths.cache_dir()) / "catalogs" / f"{digest}.json"


def save_catalog(path: Path, sae_key: str, entries: list[FeatureEntry]) -> None:
    write_json_atomic(path, {"version": CATALOG_VERSION, "sae": sae_key,
                             "features": [e.to_json() for e in entries]})


def load_catalog(path: Path, sae_key: str) -> list[FeatureEntry] | None:
    """The cached catalog, or None when missing, stale or unreadable (it is then rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != CATALOG_VERSION or data.get("sae") != sae_key:
            return None
        return [FeatureEntry.from_json(f) for f in data["features"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_labels(labels_file: str | None, sae) -> ImportedLabels | None:
    """The labels of the config's Neuronpedia explanations export (`sae.labels`) for the loaded SAE
    (anything with `neuronpedia_id` and `d_sae`, e.g. the engine's SAEParams); None when none is set.

    UserError (one line) for an export made for another SAE or a damaged file; what was skipped or could
    not be checked is in the result's notes, for the caller to show."""
    if not labels_file:
        return None
    from epo_tui.labels import LabelTarget, read_export

    return read_export(Path(labels_file), LabelTarget(neuronpedia_id=sae.neuronpedia_id, d_sae=sae.d_sae))


def with_labels(entries: list[FeatureEntry], labels: Mapping[int, str] | None) -> list[FeatureEntry]:
    """The entries with the labels given ({latent index: text}) where there is one."""
    if not labels:
        return entries
    return [replace(e, label=labels[e.index]) if e.index in labels else e for e in entries]

"""Per-SAE dataset statistics: what each latent does on real text, so a dream can be set against it.

For an SAE of F latents (F = d_sae), a store keeps, per latent:
  - `max_F`: the largest activation seen on the dataset, in the SAE's activation units (its true
    activation, as `epo-tui score` reports it); NaN where unknown;
  - `density_F`: the fraction of the dataset's tokens the latent fires on (activation > 0), in [0, 1];
    NaN where unknown;
  - optionally a histogram of its activations: `histogram_counts_FxB` (tokens per bin) over
    `histogram_edges_FxE` (E = B + 1 ascending bin edges, in activation units; a row of NaN edges and zero
    counts: no histogram for that latent; a latent with fewer bins pads with NaN edges past its last);
  - its top examples, best first: each a run of tokens with the latent's activation at every token.

On disk a store is one folder, safetensors and JSON lines only:
  - `stats.safetensors`: the arrays above (float64) and `examples_offset_F`, `examples_length_F` (int64):
    where each latent's line of examples.jsonl starts and how many bytes it has (offset -1: no examples),
    so one latent's examples are read without reading the others. Its metadata (str -> str) holds
    `format` and the provenance the writer gave (where the statistics came from).
  - `examples.jsonl`: one line per latent that has examples,
    `{"index": 5, "examples": [{"tokens": [...], "values": [...], "max_value": 3.2, "max_position": 7}, ...]}`.
A store is written whole into a temp folder beside it and renamed into place: a reader sees the old
store or the new, never half of one (a crash between the two renames leaves the old one aside, and the
next load puts it back).

Who writes one: `epo-tui import` from Neuronpedia's exports (epo_tui/neuronpedia.py); a local pass over
text can write the same store through `write_stats`. Plain Python (numpy, safetensors): the UI reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epo_tui.errors import UserError

FORMAT = "1"
STATS_FILE = "stats.safetensors"
EXAMPLES_FILE = "examples.jsonl"
NEURONPEDIA = "neuronpedia"  # the store `epo-tui import` writes; a local pass over text writes its own
SHIPPED_FOLDER = "dataset"  # the demo pack's statistics of its held-out text: <pack>/dataset/
LOCAL = "local"  # the store `epo-tui dataset` (a pass over the user's own text) writes
_OLD_MARK = ".old-"  # a store set aside while the new one is renamed into place


def sae_key(model_name: str, sae_name: str) -> str:
    """The key the data folder files things of one SAE under: the model's name (hub id or folder) and the
    SAE's display name, as the UI's worker reports them (`Ready.model`, `Ready.sae`)."""
    return f"{model_name}|{sae_name}"


def stats_folder(key: str, origin: str = NEURONPEDIA) -> Path:
    """Where the store of `origin` for the SAE `key` lives: <data>/dataset/<sha256(key)[:16]>/<origin>/."""
    from epo_tui import paths

    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return paths.data_dir() / "dataset" / digest / origin


@dataclass(frozen=True)
class Example:
    """One dataset example: `tokens[i]` as shown, `values[i]` the latent's activation at token i (its
    true activation); `max_value` = max(values), at token `max_position`."""

    tokens: tuple[str, ...]
    values: tuple[float, ...]
    max_value: float
    max_position: int

    @classmethod
    def of(cls, tokens: Sequence[str], values: Sequence[float]) -> Example:
        """An example whose maximum is read off `values` (the first token of a tie). ValueError for an
        empty example or tokens and values of different lengths."""
        if not values or len(tokens) != len(values):
            raise ValueError(f"an example needs as many tokens as values, at least one: {len(tokens)} and {len(values)}")
        position = max(range(len(values)), key=lambda i: (values[i], -i))
        return cls(tuple(tokens), tuple(float(v) for v in values), float(values[position]), position)

    def to_json(self) -> dict:
        return {"tokens": list(self.tokens), "values": list(self.values), "max_value": self.max_value,
                "max_position": self.max_position}

    @classmethod
    def from_json(cls, data: dict) -> Example:
        return cls(tuple(data["tokens"]), tuple(float(v) for v in data["values"]), float(data["max_value"]),
                   int(data["max_position"]))


@dataclass(frozen=True)
class Histogram:
    """A latent's activations binned: `counts_B[b]` tokens fell in [edges_E[b], edges_E[b + 1]) (E = B + 1)."""

    edges_E: np.ndarray
    counts_B: np.ndarray

    def percentile(self, act: float) -> float | None:
        """The share (0..100) of the histogram's tokens below `act`, spreading each bin evenly across its
        width; None for an empty histogram."""
        total = float(self.counts_B.sum())
        if total <= 0:
            return None
        below = 0.0
        for b, count in enumerate(self.counts_B):
            low, high = float(self.edges_E[b]), float(self.edges_E[b + 1])
            if act >= high:
                below += count
            elif act > low:
                below += count * (act - low) / (high - low)
        return 100.0 * below / total


class DatasetStats:
    """A store read back (see the module docstring): arrays in memory, examples read per latent on demand."""

    def __init__(self, folder: Path, arrays: Mapping[str, np.ndarray], provenance: Mapping[str, str]):
        self.folder = Path(folder)
        self.max_F = arrays["max_F"]
        self.density_F = arrays["density_F"]
        self.histogram_counts_FxB = arrays.get("histogram_counts_FxB")
        self.histogram_edges_FxE = arrays.get("histogram_edges_FxE")
        self._offset_F = arrays["examples_offset_F"]
        self._length_F = arrays["examples_length_F"]
        self.provenance = dict(provenance)

    @property
    def d_sae(self) -> int:
        return int(self.max_F.shape[0])

    def max(self, index: int) -> float | None:
        """The latent's dataset maximum (activation units); None where unknown."""
        return self._known(self.max_F, index)

    def density(self, index: int) -> float | None:
        """The fraction of dataset tokens the latent fires on (0..1); None where unknown."""
        return self._known(self.density_F, index)

    def ratio_to_max(self, act: float, index: int) -> float | None:
        """`act` as a multiple of the latent's dataset maximum (1.24: 24% above any dataset example); None
        when the maximum is unknown or not positive (a latent that never fired has no scale)."""
        top = self.max(index)
        return act / top if top is not None and top > 0 else None

    def histogram(self, index: int) -> Histogram | None:
        """The latent's activation histogram; None when the store has none for it."""
        if self.histogram_edges_FxE is None or not 0 <= index < self.d_sae:
            return None
        edges = self.histogram_edges_FxE[index]
        bins = int(np.count_nonzero(~np.isnan(edges))) - 1
        if bins < 1:
            return None
        return Histogram(edges[: bins + 1].copy(), self.histogram_counts_FxB[index, :bins].copy())

    def has_examples(self, index: int) -> bool:
        return 0 <= index < self.d_sae and int(self._offset_F[index]) >= 0

    def indices_with_examples(self) -> np.ndarray:
        """The latents with examples, ascending (int64)."""
        return np.flatnonzero(self._offset_F >= 0)

    def examples(self, index: int) -> list[Example]:
        """The latent's examples, best first ([] when none). Reads only its own line of examples.jsonl;
        UserError when that line is damaged."""
        if not self.has_examples(index):
            return []
        path = self.folder / EXAMPLES_FILE
        try:
            with open(path, "rb") as handle:
                handle.seek(int(self._offset_F[index]))
                data = handle.read(int(self._length_F[index]))
            record = json.loads(data)
            if record.get("index") != index:
                raise ValueError(f"the line there is for latent {record.get('index')}")
            return [Example.from_json(e) for e in record["examples"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{path}: the examples of latent {index} cannot be read ({err}); import them again"
                            ) from None

    def _known(self, values_F: np.ndarray, index: int) -> float | None:
        if not 0 <= index < values_F.shape[0]:
            return None
        value = float(values_F[index])
        return None if math.isnan(value) else value


def load_stats(folder: Path) -> DatasetStats | None:
    """The store in `folder`, or None when there is none. UserError (one line) when it is damaged."""
    folder = Path(folder)
    _put_back_set_aside(folder)
    path = folder / STATS_FILE
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not readable dataset statistics ({err}); import them again") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path}: dataset statistics of format {metadata.get('format')!r}, this epo-tui reads "
                        f"{FORMAT!r}; import them again")
    problem = _shape_problem(arrays)
    if problem:
        raise UserError(f"{path}: damaged dataset statistics ({problem}); import them again")
    provenance = {k: v for k, v in metadata.items() if k != "format"}
    return DatasetStats(folder, arrays, provenance)


def load_sae_stats(key: str, origin: str = NEURONPEDIA) -> DatasetStats | None:
    """The store of `origin` for the SAE `key` (see `sae_key`), or None; UserError when it is damaged."""
    return load_stats(stats_folder(key, origin))


def shipped_stats_folder(key: str) -> Path | None:
    """The statistics shipped with the demo pack (<pack>/dataset/, its held-out text) when `key` is the demo
    pack's SAE key (its model and SAE folders, wherever the package is installed), else None."""
    from epo_tui import paths

    model, _, sae = key.partition("|")
    pack = paths.demo_pack()
    try:
        same = (Path(model).resolve() == (pack / "model").resolve()
                and Path(sae).resolve() == (pack / "sae").resolve())
    except (OSError, ValueError):
        return None
    return pack / SHIPPED_FOLDER if same else None


def load_best_stats(key: str) -> DatasetStats | None:
    """The SAE's newest store of either origin (a Neuronpedia import or a local pass over text, whichever
    was written last: the one the user asked for most recently); without either, the statistics the demo
    pack ships for its own SAE (`shipped_stats_folder`), so a user's own pass or import on the demo
    replaces those; else None. UserError when the store found is damaged."""
    written = [(folder / STATS_FILE).stat().st_mtime_ns if (folder / STATS_FILE).is_file() else -1
               for folder in (stats_folder(key, origin) for origin in (NEURONPEDIA, LOCAL))]
    if max(written) >= 0:
        return load_sae_stats(key, (NEURONPEDIA, LOCAL)[written.index(max(written))])
    shipped = shipped_stats_folder(key)
    return load_stats(shipped) if shipped is not None else None


def write_stats(folder: Path, max_F: np.ndarray, density_F: np.ndarray,
                examples: Iterable[tuple[int, Sequence[Example]]],
                histogram: tuple[np.ndarray, np.ndarray] | None = None,
                provenance: Mapping[str, str] | None = None) -> None:
    """Writes a store into `folder` atomically, replacing any store there.

    `max_F`, `density_F`: one value per latent (NaN: unknown). `examples`: (latent index, its examples,
    best first) for each latent that has some, in any order, each latent once; consumed one at a time,
    so a caller can stream them. `histogram`: (counts_FxB, edges_FxE) or None. `provenance`: str -> str,
    kept in the safetensors metadata. ValueError for arrays of different F, an index outside 0..F-1, or
    a latent given twice; OSError from the file system (then the old store is left as it was)."""
    folder = Path(folder)
    max_F = np.asarray(max_F, dtype=np.float64)
    density_F = np.asarray(density_F, dtype=np.float64)
    d_sae = max_F.shape[0]
    arrays = {"max_F": max_F, "density_F": density_F}
    if histogram is not None:
        arrays["histogram_counts_FxB"] = np.asarray(histogram[0], dtype=np.float64)
        arrays["histogram_edges_FxE"] = np.asarray(histogram[1], dtype=np.float64)
    offset_F = np.full(d_sae, -1, dtype=np.int64)
    length_F = np.zeros(d_sae, dtype=np.int64)
    arrays.update(examples_offset_F=offset_F, examples_length_F=length_F)
    problem = _shape_problem(arrays)
    if problem:
        raise ValueError(problem)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.new-"))
    try:
        with open(staging / EXAMPLES_FILE, "wb") as out:
            for index, latent_examples in examples:
                if not 0 <= index < d_sae:
                    raise ValueError(f"examples for latent {index}, outside 0..{d_sae - 1}")
                if offset_F[index] >= 0:
                    raise ValueError(f"examples for latent {index} given twice")
                line = json.dumps({"index": int(index), "examples": [e.to_json() for e in latent_examples]},
                                  ensure_ascii=False).encode("utf-8") + b"\n"
                offset_F[index], length_F[index] = out.tell(), len(line)
                out.write(line)
            out.flush()
            os.fsync(out.fileno())
        from safetensors.numpy import save

        metadata = {**dict(provenance or {}), "format": FORMAT}
        with open(staging / STATS_FILE, "wb") as out:
            out.write(save(arrays, metadata=metadata))
            out.flush()
            os.fsync(out.fileno())
        _rename_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _shape_problem(arrays: Mapping[str, np.ndarray]) -> str | None:
    """What is wrong with a store's arrays, or None."""
    required = ("max_F", "density_F", "examples_offset_F", "examples_length_F")
    missing = [name for name in required if name not in arrays]
    if missing:
        return f"no {', '.join(missing)}"
    d_sae = arrays["max_F"].shape[0] if arrays["max_F"].ndim == 1 else -1
    for name in required:
        if arrays[name].shape != (d_sae,):
            return f"{name} has shape {arrays[name].shape}, not ({d_sae},) like max_F"
    if ("histogram_counts_FxB" in arrays) != ("histogram_edges_FxE" in arrays):
        return "a histogram needs both counts and edges"
    if "histogram_counts_FxB" in arrays:
        counts, edges = arrays["histogram_counts_FxB"], arrays["histogram_edges_FxE"]
        if counts.ndim != 2 or counts.shape[0] != d_sae or edges.shape != (d_sae, counts.shape[1] + 1):
            return f"histogram counts {counts.shape} and edges {edges.shape} do not fit F={d_sae}"
    return None


def _rename_into_place(staging: Path, folder: Path) -> None:
    """Puts the staged store at `folder`: the old store is renamed aside, the new one in, the old removed."""
    aside = None
    if folder.exists():
        aside = folder.with_name(f".{folder.name}{_OLD_MARK}{uuid.uuid4().hex[:8]}")
        os.replace(folder, aside)
    try:
        os.replace(staging, folder)
    except BaseException:
        if aside is not None:
            os.replace(aside, folder)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _put_back_set_aside(folder: Path) -> None:
    """After a crash between the two renames of `_rename_into_place`, the old store is back in place."""
    if folder.exists() or not folder.parent.is_dir():
        return
    aside = sorted(folder.parent.glob(f".{folder.name}{_OLD_MARK}*"), key=lambda p: p.stat().st_mtime)
    if aside:
        try:
            os.replace(aside[-1], folder)
        except OSError:
            pass  # another process put it back first

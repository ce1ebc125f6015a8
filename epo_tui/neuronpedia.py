"""Importing Neuronpedia's bulk exports of an SAE: its activations and features become the SAE's dataset
statistics (epo_tui.dataset_stats); its explanations, labels (epo_tui.labels).

Neuronpedia publishes each SAE ("source") as `v1/<modelId>/<source>/`: `source.jsonl` (one line naming the
SAE: `modelId`, `id` (the source, e.g. "6-res-jb"), `saelensRelease`, `saelensSaeId`, ...) and
`{explanations,activations,features}/batch-N.jsonl.gz`, 1,024 latents per batch. Every line names its SAE
(`modelId`, `layer`) and latent (`index`, a string or an int):
  - activations: one line per dataset example, several per latent: `tokens` (the token strings),
    `values` (the latent's activation at each token: its true activation, as `epo-tui score` reports it),
    `maxValue`, `maxValueTokenIndex`;
  - features: one line per latent: `maxActApprox` (its largest activation on Neuronpedia's dataset),
    `frac_nonzero` (the fraction of tokens it fires on), `freq_hist_data_bar_values` and
    `freq_hist_data_bar_heights` (a histogram of its non-zero activations: bin centres and counts), its
    top logits (`pos_str`, `pos_values`, `neg_str`, `neg_values`: not kept here), and more.

What an import keeps, per latent: the top-k examples by maximum (k = `top_k`); the maximum (the larger of
`maxActApprox` and the examples' maxima); the density; the histogram (edges halfway between the centres).
A later import merges with the earlier one: per latent, what the new import knows replaces what the old
one knew; what it does not know stays.

Files are read one line at a time: examples go to a temp file as they are read, and only each latent's
top-k (a value and a file offset per example) stays in memory, so an export of any size imports in
little memory. Nothing is half-imported: any error (a truncated gzip, a line that is not JSON, an export
for another SAE) is a UserError of one line naming the file (and line), and the store stays as it was.

Checked against the SAE (`ExportTarget`): a source.jsonl, or the lines' modelId/layer, naming another SAE
is refused in one line; lines for another SAE in a file that mixes sources are skipped and counted, as
are lines for latents past d_sae; each such note is one line in the result's `notes`.

Plain Python (numpy, safetensors): no engine.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epo_tui import dataset_stats
from epo_tui.dataset_stats import Example
from epo_tui.errors import UserError
from epo_tui.export_lines import (ExportTarget, count, json_records, latent_index, numbered_lines, record_source,
                                  source_names)
from epo_tui.labels import ImportedLabels, read_export, remember_imported

DEFAULT_TOP_K = 20
KINDS = ("explanations", "activations", "features")
SOURCE_FILE = "source.jsonl"
_EXPORT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_BATCH_NUMBER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class ExportFiles:
    """The files of an export, by kind, in reading order (batch-2 before batch-10)."""

    explanations: tuple[Path, ...] = ()
    activations: tuple[Path, ...] = ()
    features: tuple[Path, ...] = ()
    sources: tuple[Path, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.explanations or self.activations or self.features)


@dataclass(frozen=True)
class ImportedStats:
    """What an import of activations and features did: `latents` it gave statistics for, `examples` it
    kept (at most top_k a latent), the store's folder, and notes for the user (one line each)."""

    folder: Path
    latents: int
    examples: int
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- finding files


def find_export_files(paths: Sequence[Path]) -> ExportFiles:
    """The export files among `paths`: a folder is searched (at any depth) for `activations/`,
    `features/` and `explanations/` files and `source.jsonl`; a file's kind is its folder's name, else
    `source.jsonl` by name, else what its first record holds. UserError for a path that does not exist,
    a file of no kind, or nothing to import at all."""
    found: dict[str, list[Path]] = {kind: [] for kind in (*KINDS, "sources")}
    for path in map(Path, paths):
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                kind = _kind_by_name(file)
                if kind is not None:
                    found[kind].append(file)
        elif path.is_file():
            kind = _kind_by_name(path) or _kind_by_content(path)
            if kind is None:
                raise UserError(f"{path}: not a Neuronpedia export file (no explanations, activations, features "
                                "or source record in its first line)")
            found[kind].append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    files = ExportFiles(**{kind: tuple(dict.fromkeys(sorted(found[kind], key=_reading_order)))
                           for kind in found})
    if not files:
        shown = ", ".join(str(p) for p in paths)
        raise UserError(f"{shown}: no Neuronpedia export files (explanations/, activations/ or features/ "
                        "batches, .jsonl or .jsonl.gz) there")
    return files


def _kind_by_name(path: Path) -> str | None:
    if path.name == SOURCE_FILE:
        return "sources"
    if path.parent.name in KINDS and path.name.endswith(_EXPORT_SUFFIXES):
        return path.parent.name
    return None


def _kind_by_content(path: Path) -> str | None:
    for _, record in json_records(path):
        if isinstance(record, list):  # the older API export of explanations: one JSON array
            return "explanations"
        if not isinstance(record, dict):
            return None
        if "description" in record:
            return "explanations"
        if "values" in record or "tokens" in record:
            return "activations"
        if "maxActApprox" in record or "frac_nonzero" in record:
            return "features"
        if "saelensRelease" in record or "saelensSaeId" in record:
            return "sources"
        return None
    return None


def _reading_order(path: Path) -> tuple:
    """Paths compared folder by folder, numbers in names as numbers (batch-2 before batch-10)."""
    return tuple((int(part) if part.isdigit() else part) for part in _BATCH_NUMBER.split(str(path)))


# ---------------------------------------------------------------------------------------------- which SAE


def check_sources(sources: Sequence[Path], target: ExportTarget) -> tuple[str, ...]:
    """Checks the exports' source.jsonl files against the SAE: UserError (one line) when every one names
    another SAE; notes (one line each) for those that name another one, or cannot be checked."""
    other, unchecked = [], []
    for path in sources:
        verdict = _source_verdict(path, target)
        if verdict is False:
            other.append(path)
        elif verdict is None:
            unchecked.append(path)
    if other and len(other) == len(sources):
        raise UserError(f"{other[0]}: an export of {_source_name(other[0])}, not of this SAE "
                        f"({_target_name(target)}): not imported")
    notes = []
    if other:
        notes.append(f"{count(len(other), 'source.jsonl')} for other SAEs ({_source_name(other[0])}"
                     f"{' and more' if len(other) > 1 else ''}): their lines are skipped")
    if unchecked:
        notes.append(f"{unchecked[0]} could not be checked against this SAE (it or the SAE names neither a "
                     "Neuronpedia id nor a sae-lens release and id)")
    return tuple(notes)


def _source_record(path: Path) -> dict:
    for where, record in json_records(path, what="a source record"):
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, found {type(record).__name__}")
        return record
    raise UserError(f"{path}: empty, no source record")


def _source_verdict(path: Path, target: ExportTarget) -> bool | None:
    """Whether source.jsonl names the SAE: by Neuronpedia id when both have one, else by sae-lens release
    and SAE id; None when neither can be compared."""
    record = _source_record(path)
    model, layer = record.get("modelId"), record.get("id")
    if target.source is not None and model and layer:
        return (str(model), str(layer)) == target.source
    release, sae_id = record.get("saelensRelease"), record.get("saelensSaeId")
    if target.release and target.sae_id and release and sae_id:
        return (release, sae_id) == (target.release, target.sae_id)
    return None


def _source_name(path: Path) -> str:
    record = _source_record(path)
    names = []
    if record.get("modelId") and record.get("id"):
        names.append(f"{record['modelId']}/{record['id']}")
    if record.get("saelensRelease") and record.get("saelensSaeId"):
        names.append(f"sae-lens {record['saelensRelease']} / {record['saelensSaeId']}")
    return ", ".join(names) or "an unnamed SAE"


def _target_name(target: ExportTarget) -> str:
    if target.neuronpedia_id:
        return target.neuronpedia_id
    if target.release and target.sae_id:
        return f"sae-lens {target.release} / {target.sae_id}"
    return "no Neuronpedia id"


# ---------------------------------------------------------------------------------------------- explanations


def read_explanation_files(paths: Sequence[Path], target: ExportTarget) -> ImportedLabels:
    """The labels of several explanations exports (epo_tui.labels.read_export each; a later file's label of
    a latent replaces an earlier one's), with every file's notes, each naming its file when there are
    several."""
    labels: dict[int, str] = {}
    notes: list[str] = []
    for path in paths:
        imported = read_export(path, target)
        labels.update(imported.labels)
        notes.extend(f"{path.name}: {note}" if len(paths) > 1 else note for note in imported.notes)
    return ImportedLabels(labels=labels, notes=tuple(notes))


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class _Skips:
    """Lines read but not imported, and lines that could not be checked."""

    other_sources: Counter = field(default_factory=Counter)
    past_end: int = 0
    unchecked: int = 0
    lines: int = 0

    def notes(self, target: ExportTarget) -> list[str]:
        notes = []
        if self.other_sources:
            notes.append(f"skipped {count(sum(self.other_sources.values()), 'line')} for other SAEs "
                         f"({source_names(self.other_sources)})")
        if self.past_end:
            notes.append(f"skipped {count(self.past_end, 'line')} for latents past d_sae={target.d_sae}")
        if self.unchecked and target.source is not None:
            notes.append(f"{count(self.unchecked, 'line')} {'names' if self.unchecked == 1 else 'name'} no "
                         f"modelId/layer: not checked against this SAE ({'/'.join(target.source)})")
        if self.lines and target.source is None:
            notes.append("not checked against the SAE: it has no Neuronpedia id")
        return notes


@dataclass
class _FeatureLine:
    max_act: float | None
    density: float | None
    histogram: tuple[np.ndarray, np.ndarray] | None  # (edges_E, counts_B)


class _Reading:
    """One import's reading: checks each line's SAE and latent, streams examples to a temp file."""

    def __init__(self, target: ExportTarget, top_k: int, scratch: Path):
        self.target, self.top_k = target, top_k
        self.skips = _Skips()
        self.examples_file = open(scratch / "examples.jsonl", "w+b")  # noqa: SIM115 - closed by close()
        self.top: dict[int, list[tuple[float, int, int, int]]] = {}  # min-heap of (max, -seq, offset, length)
        self.examples_read = 0
        self.features: dict[int, _FeatureLine] = {}

    def close(self) -> None:
        self.examples_file.close()

    def records(self, path: Path, what: str) -> Iterator[tuple[str, int, dict]]:
        """(where, latent index, record) of the file's lines for this SAE's latents (the rest counted)."""
        for where, record in json_records(path, numbered_lines(path), what):
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, found {type(record).__name__}")
            if "index" not in record:
                raise UserError(f"{where}: the line has no 'index'")
            index = latent_index(record["index"], where)
            self.skips.lines += 1
            source = record_source(record)
            if source is None:
                self.skips.unchecked += 1
            elif self.target.source is not None and source != self.target.source:
                self.skips.other_sources[source] += 1
                continue
            if self.target.d_sae is not None and index >= self.target.d_sae:
                self.skips.past_end += 1
                continue
            yield where, index, record

    def read_activations(self, path: Path) -> None:
        for where, index, record in self.records(path, "an activation record"):
            example = _example(record, where)
            line = json.dumps(example.to_json(), ensure_ascii=False).encode("utf-8")
            offset = self.examples_file.seek(0, 2)
            self.examples_file.write(line)
            self.examples_read += 1
            entry = (example.max_value, -self.examples_read, offset, len(line))
            heap = self.top.setdefault(index, [])
            if len(heap) < self.top_k:
                heapq.heappush(heap, entry)
            else:
                heapq.heappushpop(heap, entry)

    def read_features(self, path: Path) -> None:
        for where, index, record in self.records(path, "a feature record"):
            self.features[index] = _FeatureLine(
                max_act=_number(record, "maxActApprox", where),
                density=_density(record, where),
                histogram=_histogram(record, where))

    def examples_of(self, index: int) -> list[Example]:
        """The latent's kept examples, best first (the earlier line first on a tie)."""
        kept = sorted(self.top.get(index, ()), reverse=True)
        out = []
        for _, _, offset, length in kept:
            self.examples_file.seek(offset)
            out.append(Example.from_json(json.loads(self.examples_file.read(length))))
        return out


def import_statistics(key: str, activations: Sequence[Path], features: Sequence[Path], target: ExportTarget,
                      top_k: int = DEFAULT_TOP_K, progress: Callable[[str], None] | None = None,
                      provenance: dict[str, str] | None = None) -> ImportedStats:
    """Reads activations and features exports for the SAE `target` describes and merges them into its
    Neuronpedia store (dataset_stats.stats_folder(key)); see the module docstring.

    `progress`, when given, hears one line per file read (when there are several). UserError (one line, naming the file and line)
    for a file that cannot be read, a malformed line, or an export for another SAE; the store then stays
    as it was. ValueError for top_k < 1."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, found {top_k}")
    folder = dataset_stats.stats_folder(key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    files = [(path, "activations") for path in activations] + [(path, "features") for path in features]
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".import-") as scratch:
        reading = _Reading(target, top_k, Path(scratch))
        try:
            for number, (path, kind) in enumerate(files, start=1):
                lines_before = reading.skips.lines
                (reading.read_activations if kind == "activations" else reading.read_features)(path)
                if progress is not None and len(files) > 1:
                    progress(f"read {path} ({kind}, {count(reading.skips.lines - lines_before, 'line')}; "
                             f"file {number}/{len(files)})")
            _refuse_another_sae(reading.skips, target, files)
            notes = reading.skips.notes(target)
            kept = sum(len(heap) for heap in reading.top.values())
            if kept < reading.examples_read:
                notes.append(f"kept the top {top_k} examples of each latent ({reading.examples_read - kept:,} "
                             "fewer)")
            notes.extend(_merge_and_write(folder, reading, target, key, files, provenance or {}))
        finally:
            reading.close()
    latents = len(set(reading.top) | set(reading.features))
    return ImportedStats(folder=folder, latents=latents, examples=kept, notes=tuple(notes))


@dataclass(frozen=True)
class ImportOutcome:
    """What `import_exports` kept: the labels (None: no explanations given), the statistics (None: no
    activations or features given), and notes on the export's source.jsonl files."""

    labels: ImportedLabels | None
    stats: ImportedStats | None
    source_notes: tuple[str, ...] = ()


def import_exports(paths: Sequence[Path], key: str, target: ExportTarget, top_k: int = DEFAULT_TOP_K,
                   progress: Callable[[str], None] | None = None) -> ImportOutcome:
    """Imports the Neuronpedia exports among `paths` (files or folders) for the SAE `target` describes,
    kept under its key `key` (`dataset_stats.sae_key`): explanations as its labels (epo_tui.labels'
    store), activations and features as its dataset statistics. Everything is read before anything is
    kept, so an export that fails leaves both stores as they were. UserError (one line) for a path with
    no export, an export of another SAE, or a damaged file."""
    files = find_export_files(paths)
    source_notes = check_sources(files.sources, target)
    explained = read_explanation_files(files.explanations, target) if files.explanations else None
    stats = None
    if files.activations or files.features:
        stats = import_statistics(key, files.activations, files.features, target, top_k=top_k, progress=progress)
    if explained is not None:
        remember_imported(key, explained.labels)
    return ImportOutcome(labels=explained, stats=stats, source_notes=source_notes)


def _refuse_another_sae(skips: _Skips, target: ExportTarget, files: list[tuple[Path, str]]) -> None:
    """UserError when every line read was for another SAE."""
    if skips.other_sources and sum(skips.other_sources.values()) == skips.lines:
        shown = files[0][0] if len(files) == 1 else f"{files[0][0]} and {len(files) - 1} more"
        raise UserError(f"{shown}: an export for {source_names(skips.other_sources)}, not for this SAE "
                        f"({'/'.join(target.source)}): not imported")


def _merge_and_write(folder: Path, reading: _Reading, target: ExportTarget, key: str,
                     files: list[tuple[Path, str]], provenance: dict[str, str]) -> list[str]:
    """The new statistics over the store's earlier ones (per latent, what is new wins), written atomically."""
    notes = []
    try:
        old = dataset_stats.load_stats(folder)
    except UserError as err:
        old = None
        notes.append(f"the earlier import could not be read and is replaced ({err})")
    seen = set(reading.top) | set(reading.features)
    d_sae = target.d_sae or max([*seen, -1]) + 1
    if old is not None:
        d_sae = max(d_sae, old.d_sae)
    new_max_F = np.full(d_sae, np.nan)
    new_density_F = np.full(d_sae, np.nan)
    for index, line in reading.features.items():
        if line.max_act is not None:
            new_max_F[index] = line.max_act
        if line.density is not None:
            new_density_F[index] = line.density
    for index, heap in reading.top.items():
        new_max_F[index] = np.fmax(new_max_F[index], max(entry[0] for entry in heap))
    max_F, density_F = new_max_F, new_density_F
    if old is not None:
        max_F = np.where(np.isnan(new_max_F), _padded(old.max_F, d_sae), new_max_F)
        density_F = np.where(np.isnan(new_density_F), _padded(old.density_F, d_sae), new_density_F)
    histogram = _merged_histograms(reading.features, old, d_sae)

    def examples() -> Iterator[tuple[int, list[Example]]]:
        for index in range(d_sae):
            if index in reading.top:
                yield index, reading.examples_of(index)
            elif old is not None and old.has_examples(index):
                yield index, old.examples(index)

    dataset_stats.write_stats(folder, max_F, density_F, examples(), histogram, {
        **provenance, "origin": dataset_stats.NEURONPEDIA, "sae_key": key,
        "neuronpedia_id": target.neuronpedia_id or "", "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "last_import": json.dumps([str(path) for path, _ in files], ensure_ascii=False)})
    return notes


def _padded(values_F: np.ndarray, d_sae: int) -> np.ndarray:
    out = np.full(d_sae, np.nan)
    out[: values_F.shape[0]] = values_F[:d_sae]
    return out


def _merged_histograms(features: dict[int, _FeatureLine], old, d_sae: int):
    """(counts_FxB, edges_FxE) with the new import's histograms over the old store's; None if neither has any."""
    new = {index: line.histogram for index, line in features.items() if line.histogram is not None}
    old_counts = old.histogram_counts_FxB if old is not None else None
    if not new and old_counts is None:
        return None
    bins = max([len(counts) for _, counts in new.values()] + [old_counts.shape[1] if old_counts is not None else 0])
    counts_FxB = np.zeros((d_sae, bins))
    edges_FxE = np.full((d_sae, bins + 1), np.nan)
    if old_counts is not None:
        rows, width = min(d_sae, old_counts.shape[0]), old_counts.shape[1]
        counts_FxB[:rows, :width] = old_counts[:rows]
        edges_FxE[:rows, : width + 1] = old.histogram_edges_FxE[:rows]
    for index, (edges, counts) in new.items():
        counts_FxB[index] = 0
        edges_FxE[index] = np.nan
        counts_FxB[index, : len(counts)] = counts
        edges_FxE[index, : len(edges)] = edges
    return counts_FxB, edges_FxE


# ---------------------------------------------------------------------------------------------- one line's fields


def _example(record: dict, where: str) -> Example:
    tokens, values = record.get("tokens"), record.get("values")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{where}: 'tokens' must be a list of strings")
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: 'values' must be a non-empty list of numbers")
    numbers = [_finite(v, "values", where) for v in values]
    if len(tokens) != len(numbers):
        raise UserError(f"{where}: {len(tokens)} tokens but {len(numbers)} values")
    return Example.of(tokens, numbers)


def _number(record: dict, name: str, where: str) -> float | None:
    value = record.get(name)
    return None if value is None else _finite(value, name, where)


def _finite(value: object, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: '{name}' must hold finite numbers, found {value!r:.40}")
    return float(value)


def _density(record: dict, where: str) -> float | None:
    density = _number(record, "frac_nonzero", where)
    if density is not None and not 0 <= density <= 1:
        raise UserError(f"{where}: 'frac_nonzero' must be a fraction in 0..1, found {density!r}")
    return density


def _histogram(record: dict, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(edges_E, counts_B) from the bin centres and heights (edges halfway between centres, the outer ones
    as far out as the next inner one is in); None when the line has none."""
    centres, heights = record.get("freq_hist_data_bar_values"), record.get("freq_hist_data_bar_heights")
    if not centres and not heights:
        return None
    if not isinstance(centres, list) or not isinstance(heights, list) or len(centres) != len(heights):
        raise UserError(f"{where}: 'freq_hist_data_bar_values' and 'freq_hist_data_bar_heights' must be lists "
                        "of the same length")
    c = np.array([_finite(v, "freq_hist_data_bar_values", where) for v in centres])
    counts = np.array([_finite(v, "freq_hist_data_bar_heights", where) for v in heights])
    if len(c) > 1 and np.any(np.diff(c) <= 0):
        raise UserError(f"{where}: 'freq_hist_data_bar_values' must be ascending")
    if len(c) == 1:
        half = max(abs(c[0]) * 0.5, 1e-6)
        return np.array([c[0] - half, c[0] + half]), counts
    inner = (c[:-1] + c[1:]) / 2
    edges = np.concatenate([[2 * c[0] - inner[0]], inner, [2 * c[-1] - inner[-1]]])
    return edges, counts

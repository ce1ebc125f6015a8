"""Feature labels in Neuronpedia's explanation-export layout: JSON lines, plain or gzipped.

Neuronpedia exports one JSON object per explanation, e.g.
`{"modelId": "gpt2-small", "layer": "6-res-jb", "index": "14057", "description": "...", ...}`, with
the index written as a string (its dataset exports, `v1/<model>/<layer>/explanations/batch-N.jsonl.gz`).
Its older API export was one JSON array of the same objects: that layout is read too, and said so.
Descriptions are kept exactly as written: code that displays them makes them inert.

Which explanation labels a latent. A latent can have several explanations. Empty (or whitespace-only)
descriptions never label anything. Among the others the best-scored wins; on a tie, or when none is
scored, the first in the file wins; a scored explanation beats an unscored one. An explanation's score
is read from, in this order (the first one present counts; null counts as absent):
  - `scores`: Neuronpedia's list of explanation scores (`{"value": 0.9, "explanationScoreTypeName": ...}`,
    one per scorer; plain numbers are accepted too): the highest value;
  - `scoreV2`, then `scoreV1`: the single-number score columns of Neuronpedia's explanations;
  - `score`: a plain number, as other tools write it.
A score that is not a finite number is an error naming the file and line. (Neuronpedia's dataset exports
carry no score at all, so there the first non-empty explanation wins.)

Checked against the SAE it labels (`LabelTarget`, from the loaded SAE): an export whose `modelId` and
`layer` do not match the SAE's Neuronpedia id (sae-lens's `neuronpedia_id`, "<modelId>/<layer>") is
refused in one line (UserError); in a file that mixes sources, only the matching explanations are kept
and the others counted. Explanations for latents past the SAE's d_sae are skipped and counted. When the
SAE has no Neuronpedia id, or a record names no modelId/layer, nothing can be checked: the labels are
read, and a note says so. Every such note is one line in `ImportedLabels.notes`, for the caller to show.

Plain Python (stdlib only), so the UI and the CLI can read labels without the engine.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from epo_tui.atomic import write_bytes_atomic
from epo_tui.errors import UserError
from epo_tui.export_lines import (ExportTarget, count, json_records, latent_index, numbered_lines, record_source,
                                  source_names)

# The order keys are written in (Neuronpedia's own fields first); other keys follow, sorted.
EXPORT_KEYS = ("modelId", "layer", "index", "description", "typeName", "explanationModelName", "automatic")
SCORE_FIELDS = ("scores", "scoreV2", "scoreV1", "score")  # where an explanation's score is read, in order


# The SAE an export is meant for (its Neuronpedia id and d_sae); the name the UI and config code use.
LabelTarget = ExportTarget


@dataclass(frozen=True)
class ImportedLabels:
    """The labels read from an export ({latent index: description}) and what the reader did that the
    user should know (skipped rows, another layout, sources it could not check): one line each."""

    labels: dict[int, str]
    notes: tuple[str, ...] = ()


@dataclass
class _Candidate:
    description: str
    score: float | None


def read_explanations(path: Path) -> dict[int, str]:
    """{latent index: description} from an export (.jsonl or .jsonl.gz, told apart by content), with
    no SAE to check it against (for files epo-tui wrote itself; imports go through `read_export`)."""
    return read_export(path).labels


def read_export(path: Path, target: LabelTarget | None = None) -> ImportedLabels:
    """The labels of an explanations export for the SAE `target` describes (see the module docstring).

    UserError (one line, naming the file) for a file that cannot be read, a malformed record, or an
    export for another SAE. With `target` None nothing is checked against an SAE."""
    path = Path(path)
    records, layout = _records(path)
    expected = target.source if target is not None else None
    d_sae = target.d_sae if target is not None else None
    best: dict[int, _Candidate] = {}
    seen_sources: Counter[tuple[str, str]] = Counter()  # of the records that name one
    other_sources: Counter[tuple[str, str]] = Counter()
    total = unchecked = past_end = empty = 0
    for where, record in records:
        index, description, score = _explanation(record, where)
        total += 1
        source = record_source(record)
        if source is None:
            unchecked += 1
        else:
            seen_sources[source] += 1
            if expected is not None and source != expected:
                other_sources[source] += 1
                continue
        if d_sae is not None and index >= d_sae:
            past_end += 1
            continue
        if not description.strip():
            empty += 1
            continue
        current = best.get(index)
        if current is None or _better(score, current.score):
            best[index] = _Candidate(description, score)

    if expected is not None and other_sources and sum(other_sources.values()) == total:
        raise UserError(f"{path}: an export for {source_names(other_sources)}, not for this SAE "
                        f"({'/'.join(expected)}): not imported")
    notes = []
    if layout == "array":
        notes.append("read as one JSON array (the layout of Neuronpedia's older API export), not JSON lines")
    if other_sources:
        notes.append(f"skipped {count(sum(other_sources.values()), 'explanation')} for other SAEs "
                     f"({source_names(other_sources)})")
    if past_end:
        notes.append(f"skipped {count(past_end, 'explanation')} for latents past d_sae={d_sae}")
    if empty:
        notes.append(f"ignored {count(empty, 'empty explanation')}")
    if target is not None and total:
        if expected is None:
            named = f" (it names {source_names(seen_sources)})" if seen_sources else ""
            notes.append(f"not checked against the SAE: it has no Neuronpedia id{named}")
        elif unchecked:
            notes.append(f"{count(unchecked, 'explanation')} {'names' if unchecked == 1 else 'name'} no "
                         f"modelId/layer: not checked against this SAE ({'/'.join(expected)})")
    labels = {index: candidate.description for index, candidate in best.items()}
    return ImportedLabels(labels=labels, notes=tuple(notes))


def write_explanations(path: Path, records: Iterable[dict]) -> None:
    """One JSON object per line, keys in EXPORT_KEYS order, written atomically (gzipped for .gz)."""
    path = Path(path)
    lines = []
    for record in records:
        missing = [key for key in ("index", "description") if key not in record]
        if missing:
            raise ValueError(f"explanation record without {' and '.join(missing)}: {record!r}")
        ordered = {key: record[key] for key in EXPORT_KEYS if key in record}
        ordered.update((key, record[key]) for key in sorted(record) if key not in ordered)
        lines.append(json.dumps(ordered, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime 0: the same labels give the same bytes
    write_bytes_atomic(path, data)


def _records(path: Path) -> tuple[Iterator[tuple[str, object]], str]:
    """(an iterator of (where, parsed record), the layout: "lines" or "array"), told apart by the first
    non-blank line: a JSON array starts with "[", JSON lines with an object."""
    lines = numbered_lines(path)
    for number, text in lines:
        if text.strip():
            break
    else:
        return iter(()), "lines"
    if text.lstrip().startswith("["):
        return _array_items(path, text + "".join(rest for _, rest in lines)), "array"
    return json_records(path, itertools.chain([(number, text)], lines), "an explanation"), "lines"


def _array_items(path: Path, text: str) -> Iterator[tuple[str, object]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not a valid JSON array ({err.msg} at line {err.lineno}, column {err.colno})"
                        ) from None
    except RecursionError:
        raise UserError(f"{path}: not an explanations array (JSON nested too deep)") from None
    for number, item in enumerate(items, start=1):
        yield f"{path}, item {number} of the array", item


def _explanation(record: object, where: str) -> tuple[int, str, float | None]:
    """(latent index, description, score or None) of one record; UserError naming `where` if malformed."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, found {type(record).__name__}")
    for key in ("index", "description"):
        if key not in record:
            raise UserError(f"{where}: the explanation has no '{key}'")
    index = latent_index(record["index"], where)
    description = record["description"]
    if not isinstance(description, str):
        raise UserError(f"{where}: 'description' must be a string, found {type(description).__name__}")
    return index, description, _score(record, where)


def _score(record: dict, where: str) -> float | None:
    """The explanation's score from the first of SCORE_FIELDS present (the module docstring says how)."""
    for field in SCORE_FIELDS:
        value = record.get(field)
        if value is None:
            continue
        if field != "scores":
            return _number(value, field, where)
        if not isinstance(value, list):
            raise UserError(f"{where}: 'scores' must be a list, found {type(value).__name__}")
        values = [_number(item.get("value") if isinstance(item, dict) else item, "scores", where)
                  for item in value]
        values = [v for v in values if v is not None]
        if values:
            return max(values)
    return None


def _number(value: object, field: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: '{field}' must hold numbers, found {value!r:.40}")
    if not math.isfinite(value):
        raise UserError(f"{where}: '{field}' must hold finite numbers, found {value!r}")
    return float(value)


def _better(score: float | None, than: float | None) -> bool:
    """Whether an explanation scored `score` takes the place of one scored `than` (ties keep the first)."""
    return score is not None and (than is None or score > than)


def imported_labels_path(sae_key: str) -> Path:
    """Where the labels a user imported in the UI for one SAE are kept (the data folder, by SAE key)."""
    from epo_tui import paths

    digest = hashlib.sha256(sae_key.encode("utf-8")).hexdigest()[:16]
    return paths.data_dir() / "labels" / f"{digest}.jsonl"


def read_imported(sae_key: str) -> dict[int, str]:
    """The labels imported earlier for `sae_key` ({} when none; UserError when the file is damaged)."""
    path = imported_labels_path(sae_key)
    return read_explanations(path) if path.exists() else {}


def remember_imported(sae_key: str, labels: dict[int, str]) -> Path:
    """Adds `labels` to those imported earlier for `sae_key` (the newest import wins) and saves them.

    Imports are kept so a restarted UI shows them again; the file records the SAE key it belongs to."""
    merged = {**read_imported(sae_key), **labels}
    path = imported_labels_path(sae_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_explanations(path, ({"index": str(index), "description": text, "saeKey": sae_key}
                              for index, text in sorted(merged.items())))
    return path

"""Feature labels in Neuronpedia's explanation-export layout: JSON lines, plain or gzipped.

Neuronpedia exports one JSON object per explanation, e.g.
`{"modelId": "gpt2-small", "layer": "6-res-jb", "index": "14057", "description": "...", ...}`, with
the index written as a string. A latent can have several explanations; the first one wins here.
Descriptions are kept exactly as written: code that displays them makes them inert.

Plain Python (stdlib only), so the UI and the CLI can read labels without the engine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from epo_tui.atomic import write_bytes_atomic
from epo_tui.errors import UserError

# The order keys are written in (Neuronpedia's own fields first); other keys follow, sorted.
EXPORT_KEYS = ("modelId", "layer", "index", "description", "typeName", "explanationModelName", "automatic")
GZIP_MAGIC = b"\x1f\x8b"
INTEGER = re.compile(r"-?[0-9]+")


def read_explanations(path: Path) -> dict[int, str]:
    """{latent index: description} from an export (.jsonl or .jsonl.gz, told apart by content)."""
    path = Path(path)
    labels: dict[int, str] = {}
    for line_number, line in _numbered_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, found {type(record).__name__}")
        for key in ("index", "description"):
            if key not in record:
                raise UserError(f"{where}: the explanation has no '{key}'")
        index = _latent_index(record["index"], where)
        description = record["description"]
        if not isinstance(description, str):
            raise UserError(f"{where}: 'description' must be a string, found {type(description).__name__}")
        labels.setdefault(index, description)
    return labels


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


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a UTF-8 file, gunzipped on the fly; read errors as UserError."""
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as handle:
            for line_number, data in enumerate(handle, start=1):
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}, line {line_number}: not UTF-8 text") from None
                yield line_number, text
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise UserError(f"{path}: not a readable gzip file ({err or 'truncated'})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def _latent_index(value: object, where: str) -> int:
    """A non-negative int from an int or a decimal string (as Neuronpedia writes it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and INTEGER.fullmatch(value.strip()):
        index = int(value)
    else:
        raise UserError(f"{where}: 'index' must be an integer or a string of digits, found {value!r}")
    if index < 0:
        raise UserError(f"{where}: 'index' must not be negative, found {value!r}")
    return index


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

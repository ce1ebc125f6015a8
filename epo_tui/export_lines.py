"""Reading Neuronpedia's export files: JSON lines, plain or gzipped, one record at a time.

What every kind of Neuronpedia export shares (explanations, activations, features): a file of JSON
objects, one a line, gzipped or not (told apart by content, not by name); each record names its SAE by
`modelId` and `layer` (Neuronpedia's source id, e.g. "6-res-jb") and its latent by `index`, written as
a string or an int. The readers of each kind (epo_tui.labels, epo_tui.neuronpedia) build on these.

Files are read line by line: no reader here holds a whole file in memory. Every problem is a UserError
of one line that names the file (and the line, where there is one).

Plain Python (stdlib only), so the UI can use it without the engine.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from epo_tui.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
INTEGER = re.compile(r"-?[0-9]+")
MAX_INDEX_DIGITS = 18  # longer is no latent index (and past 4300 digits int() refuses the string)
SHOWN_SOURCES = 3  # other sources named in a message; the rest are counted


@dataclass(frozen=True)
class ExportTarget:
    """The SAE an export is meant for: its Neuronpedia id ("<modelId>/<layer>", sae-lens's
    `neuronpedia_id`), its number of latents, and the sae-lens release and SAE id it loads from (what
    Neuronpedia's `source.jsonl` names); None where unknown (then that is not checked)."""

    neuronpedia_id: str | None = None
    d_sae: int | None = None
    release: str | None = None
    sae_id: str | None = None

    @property
    def source(self) -> tuple[str, str] | None:
        """(modelId, layer) from the Neuronpedia id; None without one (or without a layer part)."""
        model, _, layer = (self.neuronpedia_id or "").partition("/")
        return (model, layer) if model and layer else None


def is_gzipped(path: Path) -> bool:
    """Whether the file starts with gzip's magic bytes (OSError when it cannot be opened)."""
    with open(path, "rb") as raw:
        return raw.read(2) == GZIP_MAGIC


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a UTF-8 file, gunzipped on the fly, one line at a time.

    UserError for a file that cannot be read, a line that is not UTF-8, or a damaged or truncated gzip
    stream (naming the last line read whole)."""
    line_number = 0
    try:
        gzipped = is_gzipped(path)
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as handle:
            for line_number, data in enumerate(handle, start=1):
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}, line {line_number}: not UTF-8 text") from None
                yield line_number, text
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        after = f" after line {line_number}" if line_number else ""
        raise UserError(f"{path}: not a readable gzip file{after} ({err or 'truncated'})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def json_records(path: Path, lines: Iterable[tuple[int, str]] | None = None,
                 what: str = "an export record") -> Iterator[tuple[str, object]]:
    """(where, parsed JSON) of each non-blank line ("<path>, line N"); `lines` defaults to the file's.

    UserError naming the file and line for a line that is not JSON (`what` names what a line should be)."""
    for line_number, line in (numbered_lines(path) if lines is None else lines):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        except RecursionError:  # nested deeper than any export record is
            raise UserError(f"{where}: not {what} (JSON nested too deep)") from None
        yield where, record


def latent_index(value: object, where: str) -> int:
    """A non-negative int from an int or a decimal string (as Neuronpedia writes it); UserError naming
    `where` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and INTEGER.fullmatch(value.strip()) and len(value.strip()) <= MAX_INDEX_DIGITS:
        index = int(value)
    else:
        raise UserError(f"{where}: 'index' must be an integer or a string of digits, found {value!r:.40}")
    if index < 0:
        raise UserError(f"{where}: 'index' must not be negative, found {value!r}")
    return index


def record_source(record: dict) -> tuple[str, str] | None:
    """(modelId, layer) the record names, or None when it lacks either (it cannot be checked)."""
    model, layer = record.get("modelId"), record.get("layer")
    if model in (None, "") or layer in (None, ""):
        return None
    return str(model), str(layer)


def source_names(sources: Counter[tuple[str, str]]) -> str:
    """The most common sources as "model/layer", the rest counted."""
    shown = ", ".join("/".join(source) for source, _ in sources.most_common(SHOWN_SOURCES))
    more = len(sources) - SHOWN_SOURCES
    return shown + (f" and {more} more" if more > 0 else "")


def count(n: int, noun: str) -> str:
    """"1 line", "3 lines", "1,024 lines"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"

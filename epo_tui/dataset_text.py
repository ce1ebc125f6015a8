"""The text of a local dataset pass (`epo-tui dataset`): documents from plain text files and JSON-lines
files, read a piece at a time, and the fingerprint of the files' bytes that keys the pass's cache.

- A plain text file (`--text`) is one document.
- A JSON-lines file (`--jsonl`) holds one document per line, its "text" field (the Hugging Face datasets
  and Neuronpedia convention); blank lines are skipped, a line without a string "text" is an error.

Plain Python: the CLI checks the files before the model loads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from epo_tui.errors import UserError

TEXT, JSONL = "text", "jsonl"
PIECE_CHARS = 1 << 16  # a long plain text is tokenized in pieces of about this many characters, cut at line ends


@dataclass(frozen=True)
class TextSource:
    """One input file and how to read it (`TEXT` or `JSONL`)."""

    path: Path
    kind: str

    @property
    def option(self) -> str:
        return f"--{self.kind}"


@dataclass(frozen=True)
class Piece:
    """Some text of a document; `ends_document`: the document's last piece (a separator follows it)."""

    text: str
    ends_document: bool


def check_sources(sources: Sequence[TextSource]) -> None:
    """UserError (one line) when there is no file, or one is missing, a folder, or unreadable."""
    if not sources:
        raise UserError("dataset: give the text to read: --text FILE... or --jsonl FILE...")
    for source in sources:
        if not source.path.exists():
            raise UserError(f"{source.option}: {source.path} does not exist")
        if not source.path.is_file():
            raise UserError(f"{source.option}: {source.path} is not a file")
        try:
            with open(source.path, "rb") as handle:
                handle.read(1)
        except OSError as err:
            raise UserError(f"{source.option}: cannot read {source.path}: {err.strerror or err}") from None


def fingerprint(sources: Sequence[TextSource]) -> list[dict[str, str]]:
    """Each file's kind and the sha256 of its bytes, in order: what the text contributes to a pass's key."""
    out = []
    for source in sources:
        digest = hashlib.sha256()
        try:
            with open(source.path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as err:
            raise UserError(f"{source.option}: cannot read {source.path}: {err.strerror or err}") from None
        out.append({"kind": source.kind, "sha256": digest.hexdigest(), "name": source.path.name})
    return out


def pieces(sources: Sequence[TextSource]) -> Iterator[Piece]:
    """Every document of every file, in order, as pieces of text. UserError (one line, naming the file and
    line) for text that is not UTF-8 or a JSON line without a string "text"."""
    for source in sources:
        if source.kind == JSONL:
            yield from _jsonl_pieces(source.path)
        else:
            yield from _text_pieces(source.path)


def has_text(sources: Sequence[TextSource]) -> bool:
    """Whether any document holds more than white space; reads every file through, so a bad line is found
    (UserError, as `pieces`)."""
    found = False
    for piece in pieces(sources):
        found = found or bool(piece.text.strip())
    return found


def _text_pieces(path: Path) -> Iterator[Piece]:
    chunk: list[str] = []
    size = 0
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            for line in handle:
                chunk.append(line)
                size += len(line)
                if size >= PIECE_CHARS:
                    yield Piece("".join(chunk), False)
                    chunk, size = [], 0
    except UnicodeDecodeError as err:
        raise UserError(f"--text: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"--text: cannot read {path}: {err.strerror or err}") from None
    yield Piece("".join(chunk), True)


def _jsonl_pieces(path: Path) -> Iterator[Piece]:
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise UserError(f"--jsonl: {path}:{number}: expected a JSON object with a string 'text' field")
                yield Piece(text, True)
    except UnicodeDecodeError as err:
        raise UserError(f"--jsonl: {path} is not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise UserError(f"--jsonl: cannot read {path}: {err.strerror or err}") from None

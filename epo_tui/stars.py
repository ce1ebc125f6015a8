"""Per-feature stars and notes, kept in one JSON file in the data folder (`stars.json`).

Layout: `{"version": 1, "saes": {"<sae key>": {"<index>": {"star": true, "note": "..."}}}}`. The SAE key
says which SAE an index belongs to (the same index means different latents in different SAEs).

Two UIs on one machine may star features at the same time, so every change re-reads the file, applies
that one change and writes it back atomically while holding a file lock: neither loses the other's
stars. A file that cannot be read is reported (`Stars.problem`) and treated as empty; before anything
is written over it, it is kept beside as `stars.json.corrupt-<UTC time>`, so nothing saved is lost.

Plain Python: the UI uses it without the engine.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock

from epo_tui import atomic, paths
from epo_tui.errors import UserError

STARS_VERSION = 1
LOCK_TIMEOUT_S = 10.0


def stars_path() -> Path:
    return paths.data_dir() / "stars.json"


class Stars:
    """The stars and notes of one SAE's features; changes are written to disk at once."""

    def __init__(self, sae_key: str, path: Path, marks: dict[int, dict[str, Any]], problem: str | None = None):
        self.sae_key = sae_key
        self.path = Path(path)
        self.problem = problem  # one line saying why the file on disk could not be read, else None
        self._marks = marks  # {index: {"star": bool, "note": str}}, this SAE only

    @classmethod
    def load(cls, sae_key: str, path: Path | None = None) -> Stars:
        """The stars of `sae_key` (none when the file is missing; none plus `problem` when it is damaged)."""
        path = Path(path) if path is not None else stars_path()
        data, problem = _read(path)
        return cls(sae_key, path, _marks_of(data, sae_key), problem)

    # -- reading

    def is_starred(self, index: int) -> bool:
        return bool(self._marks.get(index, {}).get("star"))

    def note(self, index: int) -> str:
        return str(self._marks.get(index, {}).get("note") or "")

    def starred(self) -> set[int]:
        return {i for i, mark in self._marks.items() if mark.get("star")}

    def noted(self) -> set[int]:
        return {i for i, mark in self._marks.items() if mark.get("note")}

    # -- changing (each call is one locked read-modify-write)

    def toggle_star(self, index: int) -> bool:
        """Stars an unstarred feature or unstars a starred one; returns whether it is starred now."""
        starred = not self.is_starred(index)
        self._change(index, star=starred)
        return starred

    def set_note(self, index: int, text: str) -> None:
        """Sets the note of a feature (an empty or blank text removes it)."""
        self._change(index, note=text.strip())

    def _change(self, index: int, **fields: Any) -> None:
        lock_path = Path(f"{self.path}.lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with filelock.FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S).acquire(poll_interval=0.01):
                data, problem = _read(self.path)
                if problem is not None:
                    _keep_aside(self.path)
                    data = _empty()
                sae = data["saes"].setdefault(self.sae_key, {})
                earlier = sae.get(str(index))
                mark = {**(earlier if isinstance(earlier, dict) else {}), **fields}
                if mark.get("star") or mark.get("note"):
                    sae[str(index)] = {"star": bool(mark.get("star")), "note": str(mark.get("note") or "")}
                else:  # nothing left to keep: the file holds only features that have something
                    sae.pop(str(index), None)
                if not sae:
                    del data["saes"][self.sae_key]
                atomic.write_json_atomic(self.path, data)
        except filelock.Timeout:
            raise UserError(f"could not save the star or note to {self.path}: {lock_path} is still locked by "
                            f"another process after {LOCK_TIMEOUT_S:.0f} s") from None
        except OSError as err:
            raise UserError(f"could not save the star or note to {self.path}: {err.strerror or err}") from None
        # What is on disk now, including what other processes changed meanwhile.
        self._marks = _marks_of(data, self.sae_key)


def _empty() -> dict[str, Any]:
    return {"version": STARS_VERSION, "saes": {}}


def _read(path: Path) -> tuple[dict[str, Any], str | None]:
    """(the file's data, None), or (empty data, one line saying what is wrong with the file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _empty(), None
    except (OSError, UnicodeDecodeError) as err:
        return _empty(), f"cannot read the stars file {path}: {getattr(err, 'strerror', None) or err}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return _empty(), f"the stars file {path} is damaged (line {err.lineno}: {err.msg}); starting empty"
    if not isinstance(data, dict) or data.get("version") != STARS_VERSION or not isinstance(data.get("saes"), dict):
        return _empty(), (f"the stars file {path} is not a version-{STARS_VERSION} stars file; starting empty "
                          "(it is kept aside on the next change)")
    return data, None


def _marks_of(data: dict[str, Any], sae_key: str) -> dict[int, dict[str, Any]]:
    """{index: mark} of one SAE; entries that are not well formed are skipped (and left in the file)."""
    sae = data["saes"].get(sae_key)
    if not isinstance(sae, dict):
        return {}
    return {int(key): mark for key, mark in sae.items() if key.isdigit() and isinstance(mark, dict)}


def _keep_aside(path: Path) -> Path:
    """Renames a damaged stars file to `<name>.corrupt-<UTC time>` (never over an earlier one)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.replace(target)
    return target

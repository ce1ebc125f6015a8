"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A reader sees the old content or the new, never half of either; a failed write (disk full) leaves
the old file as it was and raises.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes, make_parents: bool = True) -> None:
    """`make_parents=False`: a missing folder is an error (a deleted session must not come back)."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, make_parents: bool = True) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), make_parents)


def write_json_atomic(path: Path, data: Any, make_parents: bool = True) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n", make_parents)

"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A reader sees the old content or the new, never half of either; a failed write (disk full) leaves
the old file as it was and raises. The file gets the permissions of any new file (0666 less the umask:
0644 under the usual 022), so collaborators can read results, which tempfile.mkstemp's 0600 prevented.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes, make_parents: bool = True) -> None:
    """`make_parents=False`: a missing folder is an error (a deleted session must not come back)."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_temp_file(path: Path) -> tuple[int, str]:
    """A new hidden file beside `path`, opened for writing (O_EXCL: never one that exists), created with
    mode 0666 so the kernel applies the umask."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def write_text_atomic(path: Path, text: str, make_parents: bool = True) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), make_parents)


def write_json_atomic(path: Path, data: Any, make_parents: bool = True) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n", make_parents)

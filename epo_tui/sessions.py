"""Every search is a session: a folder in the cache that survives a dropped SSH link or a crash.

`<cache>/sessions/<id>/` holds `session.json` (metadata, rewritten atomically), `checkpoint.safetensors`
(the search state for an exact resume), `elites.json` (what the elites at that checkpoint look like, so
the CLI and UI can export and favorite without the engine) and `history.jsonl` (the frontier history,
append-only). Plain Python: the worker writes these files, the UI and CLI read them.

Nothing here unpickles: checkpoints are safetensors read from bytes. A corrupt or half-written session
is reported in one line and skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import safetensors.numpy
from pydantic import ValidationError

from epo_tui import atomic, paths
from epo_tui.errors import UserError, did_you_mean, first_line
from epo_tui.protocol import Elite, problem_text

SESSION_VERSION = 1
ELITES_VERSION = 1
CHECKPOINT_FORMAT = "1"
STATUSES = ("running", "paused", "stopped", "finished", "crashed")
META_FILE = "session.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
ELITES_FILE = "elites.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".session.lock"  # serialises read-modify-write of session.json (worker and UI both update it)
LOCK_TIMEOUT_S = 10.0
# held by the process that runs the search for as long as it runs it: the OS drops it when that
# process dies, so a session marked running whose lock is free was interrupted (SIGKILL, power loss)
RUNNER_LOCK_FILE = ".runner.lock"
# Attempts on runner locks, one at a time in this process: the worker's reader thread probes a session
# (`is_running_elsewhere`) while its main thread may be claiming it, and two attempts at once would each
# see the other's as another process running the session.
_RUNNER_LOCK_ATTEMPTS = threading.Lock()
REQUIRED_META = ("config", "feature", "lambdas", "model", "sae", "iterations_total")
FIXED_META = ("version", "id", "created")  # set once by create_session


class SessionError(UserError):
    """A session file that cannot be read or written; the message names the file."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class SessionGone(SessionError):
    """The session's folder was deleted (e.g. `sessions delete --force`) while a process used it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if self.folder.is_dir():  # emptied, or never finished: name the file a session cannot be without
            super().__init__(self.folder / META_FILE, "missing")
        else:
            super().__init__(self.folder, "the session folder is gone")


def sessions_dir(root: Path | None = None) -> Path:
    return Path(root) if root is not None else paths.cache_dir() / "sessions"


def new_session_id(now: datetime | None = None) -> str:
    """`YYYYMMDD-HHMMSS-<6 hex>` in UTC. The tail is the microsecond (5 hex digits) and one random digit,
    so ids sort by creation time even within one second, and a prefix of the tail is easy to type."""
    now = (now or _utc_now()).astimezone(timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{now.microsecond:05x}{secrets.token_hex(1)[0]}"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _timestamp() -> str:
    return _utc_now().isoformat(timespec="seconds")


@dataclass(frozen=True)
class Session:
    folder: Path

    @property
    def id(self) -> str:
        return self.folder.name

    # -- session.json ---------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any]:
        if not (self.folder / META_FILE).exists():  # written first by create_session: without it, no session
            raise SessionGone(self.folder)
        meta = _read_json(self.folder / META_FILE)
        if not isinstance(meta, dict):
            raise SessionError(self.folder / META_FILE, f"expected a JSON object, found {type(meta).__name__}")
        version = meta.get("version")
        if version != SESSION_VERSION:
            raise SessionError(self.folder / META_FILE, f"version {version!r} is not the version this epo-tui "
                               f"reads ({SESSION_VERSION})")
        return meta

    def update_meta(self, **changes: Any) -> dict[str, Any]:
        """Set keys of session.json (others, unknown ones included, are kept) and `updated`."""
        fixed = [k for k in changes if k in FIXED_META]
        if fixed:
            raise ValueError(f"session.json: {', '.join(fixed)} cannot change")
        if "status" in changes and changes["status"] not in STATUSES:
            raise ValueError(f"status {changes['status']!r} is not one of {', '.join(STATUSES)}")
        with self._lock():
            meta = self.read_meta()
            meta.update(changes, updated=_timestamp())
            self._write(META_FILE, atomic.write_json_atomic, meta)
        return meta

    # -- checkpoint, elites ---------------------------------------------------------------------

    def write_checkpoint(self, arrays: dict[str, np.ndarray], iteration: int, elites: list[dict]) -> None:
        """The search state at `iteration`, then its elites, then session.json pointing at them.

        Each file is replaced atomically and session.json comes last, so it never claims a checkpoint
        that is not on disk. After a crash between writes the checkpoint may be newer than
        session.json says; its own `iteration` metadata is the truth for a resume.
        """
        tensors = {}
        for name, value in arrays.items():
            array = np.asarray(value)
            array = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d arrays 0-d
            if array.dtype == object:
                raise ValueError(f"checkpoint array '{name}' has dtype object; only numeric arrays are saved")
            tensors[name] = array
        saved = _timestamp()
        metadata = {"format": CHECKPOINT_FORMAT, "iteration": str(int(iteration)), "saved": saved,
                    "session": self.id}
        data = safetensors.numpy.save(tensors, metadata=metadata)
        with self._lock():
            meta = self.read_meta()  # the folder and its session.json must still be there
            self._write(CHECKPOINT_FILE, atomic.write_bytes_atomic, data)
            self._write(ELITES_FILE, atomic.write_json_atomic,
                        {"version": ELITES_VERSION, "iteration": int(iteration), "saved": saved, "elites": elites})
            meta.update(checkpoint_iteration=int(iteration), updated=saved)
            self._write(META_FILE, atomic.write_json_atomic, meta)

    def read_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """(arrays, metadata) exactly as saved. Only safetensors are parsed; nothing is unpickled."""
        path = self.folder / CHECKPOINT_FILE
        data = _read_bytes(path, missing="missing (no checkpoint saved yet)")
        metadata = _safetensors_metadata(path, data)
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise SessionError(path, f"checkpoint format {metadata.get('format')!r} is not the one this "
                               f"epo-tui reads ({CHECKPOINT_FORMAT})")
        try:
            arrays = safetensors.numpy.load(data)
        except Exception as err:  # safetensors' own error type varies between versions
            raise SessionError(path, f"not a valid safetensors file ({first_line(err)})") from None
        return arrays, metadata

    def read_elites(self) -> list[Elite]:
        """The elites at the last checkpoint ([] before the first one); SessionError for one that is not
        an elite (a damaged or hand-edited file)."""
        try:
            return [Elite.from_json(e) for e in self.read_elites_file()["elites"]]
        except ValidationError as err:
            raise SessionError(self.folder / ELITES_FILE, f"an elite is malformed ({problem_text(err)})") from None

    def read_elites_file(self) -> dict[str, Any]:
        path = self.folder / ELITES_FILE
        if not path.exists():
            return {"version": ELITES_VERSION, "iteration": None, "elites": []}
        content = _read_json(path)
        if not isinstance(content, dict) or not isinstance(content.get("elites"), list):
            raise SessionError(path, "expected a JSON object with a list of elites")
        if content.get("version") != ELITES_VERSION:
            raise SessionError(path, f"version {content.get('version')!r} is not the version this epo-tui "
                               f"reads ({ELITES_VERSION})")
        return content

    # -- history --------------------------------------------------------------------------------

    def append_history(self, points: list[dict]) -> None:
        """Frontier points, one JSON line each, flushed and fsynced: a crash loses at most a partial line.
        A failed append (disk full) is cut back off, so a retry appends the same points once."""
        if not points:
            return
        data = "".join(json.dumps(p, separators=(",", ":")) + "\n" for p in points).encode("ascii")
        path = self.folder / HISTORY_FILE
        if not self.folder.is_dir():
            raise SessionGone(self.folder)
        size = None
        try:
            with open(path, "ab") as handle:
                size = handle.tell()
                if size > 0 and not _ends_with_newline(path):
                    data = b"\n" + data  # a crash left half a line: keep it on its own (skipped) line
                try:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                except OSError:
                    handle.truncate(size)  # no half-written points left behind (best effort)
                    raise
        except OSError as err:
            if _folder_going(self.folder, err):
                raise SessionGone(self.folder) from None
            raise SessionError(path, f"could not append: {err.strerror or err}") from None

    def read_history(self) -> tuple[list[dict], list[str]]:
        """(points, problems). A partial last line (a crash mid-append) is skipped quietly; a bad line
        elsewhere is skipped and named in `problems`. Never raises for bad content."""
        path = self.folder / HISTORY_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return [], []
        except OSError as err:
            return [], [f"{HISTORY_FILE}: cannot read: {err.strerror or err}; skipped"]
        lines = data.split(b"\n")
        complete = data.endswith(b"\n")
        if complete:
            lines.pop()  # the empty string after the final newline
        points, problems = [], []
        for number, line in enumerate(lines, 1):
            is_partial_tail = number == len(lines) and not complete
            try:
                point = json.loads(line.decode("utf-8"))
                if not isinstance(point, dict):
                    raise ValueError(f"expected a JSON object, found {type(point).__name__}")
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if not is_partial_tail and line.strip():
                    problems.append(f"{HISTORY_FILE} line {number}: {_json_reason(err)}; skipped")
                continue
            points.append(point)
        return points, problems

    # -- who runs it ----------------------------------------------------------------------------

    def claim(self) -> filelock.FileLock:
        """The runner's lock, held until released; SessionError if another process runs this session."""
        with _RUNNER_LOCK_ATTEMPTS:
            return self._claim()

    def _claim(self) -> filelock.FileLock:
        if not self.folder.is_dir():
            raise SessionGone(self.folder)
        path = self.folder / RUNNER_LOCK_FILE
        lock = filelock.FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise SessionError(self.folder, "another process is running this session") from None
        except OSError:
            if not self.folder.is_dir():
                raise SessionGone(self.folder) from None
            raise
        _unless_deleted_meanwhile(lock, path)
        return lock

    def is_running_elsewhere(self) -> bool:
        """Whether a live process holds this session's runner lock (this one included, while it runs it)."""
        with _RUNNER_LOCK_ATTEMPTS:  # a probe is a claim released at once: never two at a time
            try:
                self._claim().release()
            except SessionError:
                return self.folder.is_dir()
            return False

    # -- helpers --------------------------------------------------------------------------------

    def _lock(self) -> filelock.FileLock:
        if not self.folder.is_dir():  # FileLock would recreate a deleted folder
            raise SessionGone(self.folder)
        return _TimedLock(self.folder / LOCK_FILE)

    def _write(self, name: str, writer, content) -> None:
        try:
            writer(self.folder / name, content, make_parents=False)  # a deleted folder stays deleted
        except OSError as err:
            if _folder_going(self.folder, err):
                raise SessionGone(self.folder) from None
            raise SessionError(self.folder / name, f"could not write: {err.strerror or err}") from None


def _unless_deleted_meanwhile(lock: filelock.FileLock, path: Path) -> None:
    """After acquiring `lock` (its file at `path` in a session folder): SessionGone, and no trace left,
    when the folder was deleted meanwhile and FileLock made it again (it creates missing parents)."""
    folder = path.parent
    if (folder / META_FILE).exists():
        return
    lock.release()
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only if empty: nothing but our own lock file was in it
    raise SessionGone(folder)


class _TimedLock:
    """A FileLock whose timeout is a SessionError naming the lock file."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = filelock.FileLock(str(path), timeout=LOCK_TIMEOUT_S)

    def __enter__(self):
        try:
            self.lock.acquire(poll_interval=0.01)
        except filelock.Timeout:
            raise SessionError(self.path, f"still locked by another process after {LOCK_TIMEOUT_S:.0f} s") from None
        except OSError as err:
            if not self.path.parent.is_dir():
                raise SessionGone(self.path.parent) from None
            raise SessionError(self.path, f"cannot lock: {err.strerror or err}") from None
        _unless_deleted_meanwhile(self.lock, self.path)
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


def _folder_going(folder: Path, err: OSError) -> bool:
    """Whether a failed write means the folder is gone or being deleted: a file we just created (or the
    folder) vanished under us. Any other error (disk full, permissions) is the file's own problem."""
    return err.errno == errno.ENOENT or not folder.is_dir()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _read_bytes(path: Path, missing: str = "missing") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SessionError(path, missing) from None
    except OSError as err:
        raise SessionError(path, f"cannot read: {err.strerror or err}") from None


def _read_json(path: Path) -> Any:
    data = _read_bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as err:
        raise SessionError(path, _json_reason(err)) from None


def _json_reason(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON (line {err.lineno} column {err.colno})"
    if isinstance(err, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {err.start})"
    return str(err)


def _safetensors_metadata(path: Path, data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (8-byte little-endian length, then JSON), checked
    before any tensor is parsed, so anything else (a pickle, a truncated file) is refused early."""
    if len(data) < 8:
        raise SessionError(path, f"not a safetensors file ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8 or data[8:9] != b"{":
        raise SessionError(path, "not a safetensors file (no header; a pickle or a truncated file?)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except ValueError as err:
        raise SessionError(path, f"not a safetensors file (header: {_json_reason(err)})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise SessionError(path, "safetensors header has no epo-tui metadata")
    return {str(k): str(v) for k, v in metadata.items()}


# ----------------------------------------------------------------------------------------------
# Creating, listing, finding, deleting


def create_session(meta: dict[str, Any], root: Path | None = None) -> Session:
    """A new session folder with its session.json (status running)."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"session metadata is missing {', '.join(missing)}")
    base = sessions_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    while True:
        session_id = new_session_id()
        try:
            (base / session_id).mkdir()
            break
        except FileExistsError:  # same second, same 6 hex digits
            continue
    now = _timestamp()
    ours = {"version": SESSION_VERSION, "id": session_id, "created": now, "updated": now, "status": "running"}
    content = {**ours, "label": None, "iteration": 0, "checkpoint_iteration": None, "error": None, **meta, **ours}
    session = Session(base / session_id)
    session._write(META_FILE, atomic.write_json_atomic, content)
    return session


@dataclass(frozen=True)
class SessionSummary:
    """One line of `epo-tui sessions list` / the UI's session picker."""

    id: str
    folder: Path
    status: str
    created: str
    updated: str
    features: list[int]
    label: str | None
    model: str
    sae: str
    iteration: int
    iterations_total: int
    checkpoint_iteration: int | None
    error: str | None
    meta: dict[str, Any] = field(repr=False)

    @property
    def session(self) -> Session:
        return Session(self.folder)

    @property
    def shown_status(self) -> str:
        """The status to show: a session marked running or paused whose runner no longer holds its lock
        was interrupted (killed, a crash, a power cut) and resumes from its last checkpoint."""
        if self.status in ("running", "paused") and not self.session.is_running_elsewhere():
            return "interrupted"
        return self.status


def summarize(session: Session, meta: dict[str, Any]) -> SessionSummary:
    """The listed summary of a session from its session.json; TypeError or ValueError for a mistyped field."""
    feature = meta.get("feature") or {}
    sae = meta.get("sae") or {}
    return SessionSummary(
        id=session.id, folder=session.folder, status=str(meta.get("status", "?")),
        created=str(meta.get("created", "")), updated=str(meta.get("updated", "")),
        features=list(feature.get("indices") or []), label=meta.get("label"),
        model=str(meta.get("model", "")), sae=str(sae.get("name", "")),
        iteration=int(meta.get("iteration") or 0), iterations_total=int(meta.get("iterations_total") or 0),
        checkpoint_iteration=meta.get("checkpoint_iteration"), error=meta.get("error"), meta=meta)


def _session_folders(base: Path) -> list[Path]:
    """Candidate session folders, newest first (ids sort by creation time)."""
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name, reverse=True)


def list_sessions(root: Path | None = None) -> tuple[list[SessionSummary], list[str]]:
    """(sessions newest first, problems): an unreadable session is one line in problems, not an error."""
    summaries, problems = [], []
    for folder in _session_folders(sessions_dir(root)):
        session = Session(folder)
        try:
            summaries.append(summarize(session, session.read_meta()))
        except SessionError as err:
            problems.append(f"{session.id}: {err.path.name}: {err.reason}; skipped")
        except (TypeError, ValueError, AttributeError) as err:  # valid JSON of the wrong shape
            problems.append(f"{session.id}: {META_FILE}: {first_line(err)}; skipped")
    return summaries, problems


def find_session(query: str, root: Path | None = None) -> Session:
    """The session whose id is `query`, starts with it, or whose 6-hex tail starts with it."""
    base = sessions_dir(root)
    names = [p.name for p in _session_folders(base)]
    if query in names:
        return Session(base / query)
    matches = [n for n in names if query and n.startswith(query)]
    if not matches:
        matches = [n for n in names if query and n.rsplit("-", 1)[-1].startswith(query)]
    if len(matches) == 1:
        return Session(base / matches[0])
    if matches:
        shown = ", ".join(matches[:5]) + (", …" if len(matches) > 5 else "")
        raise UserError(f"session '{query}' is ambiguous: it matches {shown}; give more of the id")
    raise UserError(f"no session '{query}'{did_you_mean(query, names)} (see `epo-tui sessions list`)")


def delete_session(session_id: str, root: Path | None = None, force: bool = False) -> None:
    """Remove a session's folder. A session marked running is refused unless `force` (its worker
    would keep writing); so is any name that is not a plain folder directly inside the sessions dir."""
    base = sessions_dir(root).resolve()
    folder = base / session_id
    if (not session_id or session_id in (".", "..") or "/" in session_id or os.sep in session_id
            or folder.is_symlink() or folder.resolve().parent != base or not folder.is_dir()):
        raise UserError(f"no session '{session_id}' in {base}")
    if not force:
        try:
            status = Session(folder).read_meta().get("status")
        except SessionError:
            status = None  # unreadable: nothing runs it
        if status == "running":
            raise UserError(f"session {session_id} is running; stop it first (or delete with --force if "
                            "its worker is gone)")
    _remove_folder(folder)


DELETE_ATTEMPTS = 100


def _remove_folder(folder: Path) -> None:
    """shutil.rmtree, walked again while a worker still writes into the folder (`--force` on a running
    session): a file appearing makes the last rmdir fail, one renamed away makes the walk fail; either
    way the folder may still be there. Done only when it is gone; the worker then stops at its next
    write (it never recreates the folder)."""
    for _ in range(DELETE_ATTEMPTS):
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass  # something vanished mid-walk: look again
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise UserError(f"could not delete {folder}: {err.strerror or err}") from None
        if not os.path.lexists(folder):
            return
        time.sleep(0.01)
    raise UserError(f"could not delete {folder}: files kept appearing in it")

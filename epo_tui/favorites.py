"""Saved prompts, appended to one markdown file the user keeps (`favorites.md` in the data folder).

Each entry starts with a fixed marker line so entries can be counted and read back. All text that came
from a tokenizer or a config goes in either escaped (`results.md_text`) or, for the prompt itself, inert
(`text.inert`) inside a fence longer than any run in it: nothing a token holds can forge a marker, close
the fence or add markup. Appends hold a file lock and rewrite the file atomically, so two processes
never interleave and a full disk leaves what was saved before untouched.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock

from epo_tui import atomic, paths
from epo_tui.errors import UserError
from epo_tui.protocol import Elite
from epo_tui.results import code_span, marked_prompt, md_text, md_token, number
from epo_tui.session_report import utc_text
from epo_tui.text import inert

MARKER = "<!-- epo-tui favorite -->"
FILE_HEADING = "# epo-tui favorites\n"
LOCK_TIMEOUT_S = 10.0
FAVORITE_KEYS = ("features", "label", "model", "sae", "hook", "prompt", "tokens", "activations",
                 "prompt_start", "act", "xent", "penalty", "saved", "session")


def favorites_path(config) -> Path:
    """`[favorites] path` from the config, else favorites.md in the data folder."""
    return paths.expand_user(config.favorites.path) if config.favorites.path else paths.data_dir() / "favorites.md"


def favorite_from_elite(session_meta: dict, elite: Elite, saved: datetime | str | None = None,
                        dataset_max: float | None = None) -> dict[str, Any]:
    """A favorite from a session's metadata and one of its elites; `dataset_max`, the searched latent's
    dataset maximum where known, puts the elite's ratio to it in the entry."""
    sae = session_meta.get("sae") or {}
    return {
        "features": list((session_meta.get("feature") or {}).get("indices") or []),
        "label": session_meta.get("label"),
        "model": session_meta.get("model", ""),
        "sae": sae.get("name", ""),
        "hook": sae.get("hook", ""),
        "prompt": elite.text,
        "tokens": list(elite.tokens),
        "token_ids": list(elite.token_ids),
        "activations": list(elite.activations),
        "prompt_start": elite.prompt_start,
        "act": elite.act,
        "xent": elite.xent,
        "penalty": elite.penalty,
        "saved": saved if saved is not None else datetime.now(timezone.utc),
        "session": session_meta.get("id"),
        "dataset_ratio": elite.act / dataset_max if dataset_max is not None and dataset_max > 0 else None,
    }


def render_entry(fav: dict[str, Any]) -> str:
    """One entry: marker, heading, facts, the prompt verbatim in a fence, then per-token activations."""
    missing = [k for k in FAVORITE_KEYS if k not in fav]
    if missing:
        raise ValueError(f"favorite is missing {', '.join(missing)}")
    features = [int(f) for f in fav["features"]]
    heading = f"{'Features' if len(features) > 1 else 'Feature'} {', '.join(str(f) for f in features)}"
    if fav["label"]:
        heading += f": {md_text(str(fav['label']))}"
    start = int(fav["prompt_start"])
    tokens, acts = list(fav["tokens"]), [float(a) for a in fav["activations"]]
    token_ids = list(fav.get("token_ids") or [])
    source = f" from session `{code_span(fav['session'])}`" if fav["session"] else ""
    lines = [MARKER, f"## {heading}", "",
             f"- model `{code_span(fav['model'])}` · SAE `{code_span(fav['sae'])}` at `{code_span(fav['hook'])}`",
             f"- act {number(fav['act'])}{_versus_dataset(fav.get('dataset_ratio'))} · xent {number(fav['xent'])}"
             f" · λ {float(fav['penalty']):.2f}",
             f"- saved {utc_text(fav['saved'])}{source}"]
    if start > 0:
        lines.append(f"- after the prefix `{code_span(''.join(tokens[:start]))}`")
    prompt = inert(str(fav["prompt"]))  # one line: newlines and controls become visible escapes
    fence = "~" * max(3, _longest_run(prompt, "~") + 1)
    lines += ["", f"{fence}text", prompt, fence, "", marked_prompt(tokens[start:], acts[start:]), ""]
    with_ids = len(token_ids) == len(tokens)
    lines += ["| pos | token | id | act |" if with_ids else "| pos | token | act |",
              "|---:|---|---:|---:|" if with_ids else "|---:|---|---:|"]
    for pos in range(start, len(tokens)):
        id_cell = f" {int(token_ids[pos])} |" if with_ids else ""
        lines.append(f"| {pos} | {md_token(tokens[pos])} |{id_cell} {number(acts[pos])} |")
    return "\n".join(lines) + "\n"


def _versus_dataset(ratio: float | None) -> str:
    """' (1.18× the dataset maximum)', or '' when unknown."""
    return f" ({float(ratio):.2f}× the dataset maximum)" if ratio is not None else ""


def _longest_run(text: str, char: str) -> int:
    longest = run = 0
    for c in text:
        run = run + 1 if c == char else 0
        longest = max(longest, run)
    return longest


def append_favorite(path: Path, fav: dict[str, Any]) -> Path:
    """Add one entry to the favorites file (created with a heading if new); returns the file written.

    A symlinked file is written through the link. The earlier content is never at risk: the new file
    is written beside it and renamed over it only when complete.
    """
    entry = render_entry(fav).encode("utf-8")
    path = paths.expand_user(path)
    path = path.resolve() if path.is_symlink() else path
    lock_path = Path(f"{path}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S).acquire(poll_interval=0.01):
            try:
                existing = path.read_bytes()
                mode = path.stat().st_mode & 0o7777
            except FileNotFoundError:
                existing, mode = b"", None
            existing = existing or FILE_HEADING.encode("utf-8")
            if not existing.endswith(b"\n"):
                existing += b"\n"
            atomic.write_bytes_atomic(path, existing + b"\n" + entry)
            if mode is not None:  # keep the file's permissions (the atomic write's temp file is 0600)
                with contextlib.suppress(OSError):
                    os.chmod(path, mode)
    except filelock.Timeout:
        raise UserError(f"could not save the favorite to {path}: {lock_path} is still locked by another "
                        f"process after {LOCK_TIMEOUT_S:.0f} s") from None
    except OSError as err:
        raise UserError(f"could not save the favorite to {path}: {err.strerror or err}") from None
    return path


def read_favorites(path: Path) -> list[str]:
    """The entries' markdown, in file order ([] when the file does not exist).

    An entry starts at a marker line that follows a blank line: the only place a marker-like line can
    come from a token is the fenced prompt, whose line always follows the fence.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise UserError(f"cannot read favorites from {path}: {err.strerror or err}") from None
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line == MARKER and (i == 0 or lines[i - 1] == "")]
    entries = []
    for start, end in zip(starts, starts[1:] + [len(lines)]):
        body = lines[start:end]
        while body and body[-1] == "":
            body.pop()
        entries.append("\n".join(body) + "\n")
    return entries

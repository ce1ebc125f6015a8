"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from epo_tui.text import inert


class UserError(Exception):
    """Bad input or an unavailable resource, described in one line the user can act on."""


class ConfigError(UserError):
    """A config value that is wrong: names the file, the key, what was found and what is allowed."""

    def __init__(self, source: str, key: str, message: str):
        self.source = source
        self.key = key
        # keys and values come from the file: shown inert, so the message stays one line
        super().__init__(inert(f"{source}: {key}: {message}" if key else f"{source}: {message}"))


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """'; did you mean 'x'?' for the closest choice(s), or '' when none is close."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def first_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def require_utf8(text: str, what: str) -> None:
    """Raises UserError when `text` (named `what` in the message) cannot be UTF-8: lone surrogates, as
    JSON `\\ud800` or argv bytes that were not UTF-8 (surrogateescape) make."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserError(f"{what} is not valid UTF-8 (at character {err.start})") from None

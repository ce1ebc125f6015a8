"""The config's `[keys]`: rebinding the UI's keys by binding id, checked before the app starts.

Every rebindable binding has an id "<scope>.<action>" ("main.start", "features.random",
"sessions.resume"); the help screen lists them. Textual's own keymap (`App.set_keymap`) does the
rebinding; this module checks a keymap first, because Textual accepts anything and silently lets one
binding shadow another: an unknown id, a key Textual has no name for, a key reserved by Textual itself,
and two actions on one key where both are active at once are each one ConfigError naming the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from textual.binding import Binding
from textual.keys import KEY_NAME_REPLACEMENTS, Keys, _character_to_key, key_to_character

from epo_tui.errors import ConfigError, did_you_mean

# Textual's own keys, active on every screen (the command palette, quit, copy, focus moves)
RESERVED_KEYS = {"ctrl+p": "the command palette", "ctrl+q": "quit", "ctrl+c": "copy",
                 "tab": "focus next", "shift+tab": "focus previous"}
MODIFIERS = ("ctrl", "alt", "shift", "meta", "super", "hyper")
# "f1", "escape", "pageup", ..., and Textual's short names of characters ("plus", "slash")
NAMED_KEYS = frozenset([*(key.value for key in Keys if "+" not in key.value), *KEY_NAME_REPLACEMENTS.values()])


@dataclass(frozen=True)
class KeyScope:
    """Bindings active together: `where` names them for the user (the help screen's heading); scopes
    with the same `group` are active at once (the main screen's own keys and its feature list's), so a
    key may not do two things across them."""

    where: str
    bindings: tuple[Binding, ...]
    group: str


def key_name(text: str) -> str:
    """Textual's name for a key as a user writes it: "?" → "question_mark", "Ctrl+F5" → "ctrl+f5"; a
    single letter keeps its case ("R" and "r" are two keys). ValueError for a key Textual cannot name."""
    *modifiers, base = text.strip().split("+") if text.strip() != "+" else ["+"]
    modifiers = [m.lower() for m in modifiers]
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if unknown:
        raise ValueError(f"'{unknown[0]}' is not a modifier (modifiers: {', '.join(MODIFIERS)})")
    if len(base) == 1:
        base = _character_to_key(base)
    else:
        base = base.lower()
    if len(base) > 1 and base not in NAMED_KEYS and key_to_character(base) is None:
        raise ValueError(f"'{base}' is not a key Textual knows{did_you_mean(base, NAMED_KEYS)} (a character, "
                         "or a name such as f5, escape, pageup, question_mark)")
    return "+".join([*modifiers, base])


def checked_keymap(keymap: Mapping[str, str], scopes: Iterable[KeyScope], source: str) -> dict[str, str]:
    """The config's keymap ({binding id: comma-separated keys}) with Textual's key names, ready for
    `App.set_keymap`. Raises ConfigError (one line, naming `keys.<id>`) for an id no binding has, a key
    Textual cannot name, a reserved key, or a key that two actions would share within one group."""
    scopes = list(scopes)
    known = {b.id for scope in scopes for b in scope.bindings if b.id}
    normalized: dict[str, str] = {}
    for binding_id, keys in keymap.items():
        where = f"keys.{binding_id}"
        if binding_id not in known:
            raise ConfigError(source, where, f"no key has this id{did_you_mean(binding_id, known)} (the help "
                              "screen, ? in the app, lists every id)")
        names = []
        for key in keys.split(","):
            try:
                names.append(key_name(key))
            except ValueError as err:
                raise ConfigError(source, where, str(err)) from None
            if names[-1] in RESERVED_KEYS:
                raise ConfigError(source, where, f"'{key.strip()}' is Textual's key for "
                                  f"{RESERVED_KEYS[names[-1]]}; choose another")
        normalized[binding_id] = ",".join(names)
    _refuse_conflicts(normalized, scopes, source)
    return normalized


def _refuse_conflicts(keymap: Mapping[str, str], scopes: list[KeyScope], source: str) -> None:
    owners: dict[tuple[str, str], tuple[str, str]] = {}  # (group, key) → (binding id, where)
    for scope in scopes:
        for binding in scope.bindings:
            if binding.id is None:
                continue
            for key in bound_keys(binding, keymap):
                owner_id, owner_where = owners.setdefault((scope.group, key), (binding.id, scope.where))
                if owner_id == binding.id:
                    continue
                # blame the rebinding: the defaults share no key (a test keeps it so)
                if binding.id in keymap:
                    blamed, other, other_where = binding.id, owner_id, owner_where
                else:
                    blamed, other, other_where = owner_id, binding.id, scope.where
                shown = key_to_character(key) or key  # "?" rather than question_mark
                raise ConfigError(source, f"keys.{blamed}", f"'{shown}' is already the key of {other} "
                                  f"({other_where}); rebind {other} too, or choose another key")


def bound_keys(binding: Binding, keymap: Mapping[str, str]) -> list[str]:
    """The keys a binding answers to under `keymap` (its own where the keymap leaves it alone)."""
    keys = keymap.get(binding.id, binding.key) if binding.id else binding.key
    return [k.strip() for k in keys.split(",")]


def rebound(bindings: Iterable[Binding], keymap: Mapping[str, str]) -> list[Binding]:
    """The bindings as the keymap leaves them (one per key), for listing them: the help screen, the
    palette. Bindings that share an id (one action on several keys) are listed once."""
    result, seen = [], set()
    for binding in bindings:
        if binding.id in keymap:
            if binding.id in seen:
                continue
            seen.add(binding.id)
            result.extend(binding.with_key(key, key_display=None) for key in bound_keys(binding, keymap))
        else:
            result.append(binding)
    return result

"""Theme files (TOML): Textual theme colours plus the activation colour scale.

Shipped themes live in `themes/`; users add their own in `<config dir>/themes/*.toml`, which win
over shipped ones of the same name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import tomli

from epo_tui import paths
from epo_tui.errors import ConfigError, UserError, did_you_mean

DEFAULT_THEME = "epo-dark"
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")
_COLOUR_KEYS = ("primary", "secondary", "accent", "foreground", "background", "surface", "panel",
                "success", "warning", "error")


@dataclass(frozen=True)
class Theme:
    name: str
    dark: bool
    colours: dict[str, str]  # Textual theme colour name -> hex
    activation_scale: tuple[str, ...]  # low -> high
    activation_text: str

    def activation_colour(self, fraction: float) -> str:
        """The scale's colour for an activation at `fraction` (0..1) of the strongest one shown."""
        fraction = min(max(fraction, 0.0), 1.0)
        return self.activation_scale[round(fraction * (len(self.activation_scale) - 1))]


def load_theme_file(path: Path) -> Theme:
    source = str(path)
    try:
        data = tomli.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(source, "", f"cannot read theme: {err}") from None
    except tomli.TOMLDecodeError as err:
        raise ConfigError(source, "", f"invalid TOML at line {err.lineno}, column {err.colno}: {err.msg}") from None
    theme, activation = data.get("theme", {}), data.get("activation", {})
    name = theme.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(source, "theme.name", "missing (a theme needs a name)")
    colours = {}
    for key in _COLOUR_KEYS:
        colours[key] = _hex(theme.get(key), source, f"theme.{key}")
    scale = activation.get("scale")
    if not isinstance(scale, list) or len(scale) < 2:
        raise ConfigError(source, "activation.scale", "expected a list of at least 2 hex colours")
    return Theme(
        name=name,
        dark=bool(theme.get("dark", True)),
        colours=colours,
        activation_scale=tuple(_hex(c, source, "activation.scale") for c in scale),
        activation_text=_hex(activation.get("text", colours["foreground"]), source, "activation.text"),
    )


def _hex(value, source: str, key: str) -> str:
    if not isinstance(value, str) or not _HEX.match(value):
        raise ConfigError(source, key, f"expected a colour like \"#1c1c1c\", found {value!r}")
    return value


def available_themes() -> dict[str, Path]:
    """Theme name -> file, shipped first, then the user's (which override by name)."""
    found: dict[str, Path] = {}
    for folder in (paths.shipped_dir("themes"), paths.config_dir() / "themes"):
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                found[load_theme_file(path).name] = path
            except ConfigError:
                continue  # a broken user theme is reported when chosen, not on every start
    return found


def load_theme(name: str = DEFAULT_THEME) -> Theme:
    themes = available_themes()
    if name not in themes:
        raise UserError(f"unknown theme '{name}'{did_you_mean(name, themes)} (themes: {', '.join(themes)})")
    return load_theme_file(themes[name])

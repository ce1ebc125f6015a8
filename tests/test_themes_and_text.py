"""Theme files and inert token text."""

from __future__ import annotations

import pytest

from epo_tui import paths
from epo_tui.errors import ConfigError, UserError
from epo_tui.text import inert
from epo_tui.themes import available_themes, load_theme, load_theme_file


def test_shipped_themes_load_with_their_activation_scales():
    dark, light = load_theme("epo-dark"), load_theme("epo-light")
    assert dark.dark and not light.dark
    assert dark.activation_colour(0.0) == dark.activation_scale[0]
    assert dark.activation_colour(1.0) == dark.activation_scale[-1]
    assert dark.activation_colour(7.0) == dark.activation_scale[-1]  # clamped
    assert light.colours["background"] == "#fafafa"


def test_user_themes_join_and_override_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    folder = paths.config_dir() / "themes"
    folder.mkdir(parents=True)
    text = (paths.shipped_dir("themes") / "dark.toml").read_text()
    (folder / "mine.toml").write_text(text.replace('"epo-dark"', '"mine"'))
    (folder / "over.toml").write_text(text.replace('#1c1c1c', '#000000'))
    (folder / "broken.toml").write_text("[theme\n")
    themes = available_themes()
    assert {"epo-dark", "epo-light", "mine"} <= set(themes)
    assert load_theme("epo-dark").colours["background"] == "#000000"


def test_unknown_theme_suggests():
    with pytest.raises(UserError, match="did you mean 'epo-dark'"):
        load_theme("epo-drak")


def test_bad_theme_colour_names_the_key(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('[theme]\nname = "x"\nprimary = "blue"\n')
    with pytest.raises(ConfigError, match=r"t.toml: theme.primary: expected a colour like"):
        load_theme_file(bad)


@pytest.mark.parametrize("raw, shown", [
    ("\x1b[31mred", "\\x1b[31mred"),
    ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
    ("\x07\x00\x7f", "\\x07\\x00\\x7f"),
    ("\u202eevil", "\\u202eevil"),  # right-to-left override
    ("\x85\x9b[2J", "\\u0085\\u009b[2J"),  # C1 controls: \x80..\xff is left to raw bytes (token_text)
    ("\u2028", "\\u2028"),
    (" café ✓", " café ✓"),
])
def test_inert_makes_control_characters_visible(raw, shown):
    assert inert(raw) == shown

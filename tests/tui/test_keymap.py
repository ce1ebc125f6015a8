"""`[keys]` in the config: the TOML is read into binding ids, checked (unknown ids, unnamed keys,
Textual's own keys, conflicts) before the app starts, and a rebound key does the action while its old
key no longer does; the help screen and the palette show the new key."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import subprocess
import sys

import pytest
from rich.console import Console

from epo_tui.config import Config, FeatureConfig, parse_config
from epo_tui.errors import ConfigError
from epo_tui.tui.app import key_scopes
from epo_tui.tui.components.status import StatusBar
from epo_tui.tui.keymap import checked_keymap, key_name
from epo_tui.tui.screens.help import HelpScreen
from tui_pilot import fake_app, ready, until


def _keymap(toml: str) -> dict[str, str]:
    return checked_keymap(parse_config(toml, source="my.toml").keys, key_scopes(), "my.toml")


def _refused(toml: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _keymap(toml)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_keys_read_as_tables_dotted_keys_or_arrays():
    assert _keymap('[keys.main]\nstart = "w"\n[keys.features]\nrandom = ["F6", "#"]\n') == \
        {"main.start": "w", "features.random": "f6,number_sign"}
    assert _keymap('[keys]\nmain.pause = "ctrl+G"\n"sessions.resume" = "Home"\n') == \
        {"main.pause": "ctrl+G", "sessions.resume": "home"}
    assert _keymap("") == {}  # the defaults: no key does two things anywhere
    assert "keys.features.random: '?' is already the key of main.help" in _refused(
        '[keys.features]\nrandom = "?"\n')


def test_keys_are_not_part_of_a_searchs_config():
    config = parse_config('[keys.main]\nstart = "w"\n')
    assert config.keys == {"main.start": "w"} and "keys" not in config.to_dict()
    assert config == Config()  # the same search


def test_swapping_two_keys_is_no_conflict():
    assert _keymap('[keys.main]\nstart = "p"\npause = "s"\n') == {"main.start": "p", "main.pause": "s"}


def test_a_key_two_actions_would_share_is_refused_naming_both():
    assert _refused('[keys.main]\nstart = "p"\n') == (
        "my.toml: keys.main.start: 'p' is already the key of main.pause (main screen); rebind main.pause too, "
        "or choose another key")
    # the feature list's keys are active with the main screen's
    assert "keys.features.random: 'x' is already the key of main.stop (main screen)" in \
        _refused('[keys.features]\nrandom = "x"\n')
    # each modal screen is its own group: q may close the sessions browser and quit the app
    assert _keymap('[keys.sessions]\nresume = "x"\n') == {"sessions.resume": "x"}


@pytest.mark.parametrize(("toml", "expected"), [
    ('[keys.main]\nstrat = "g"\n', "my.toml: keys.main.strat: no key has this id; did you mean 'main.start'?"),
    ('[keys.main]\nstart = "ctrl+p"\n', "keys.main.start: 'ctrl+p' is Textual's key for the command palette"),
    ('[keys.main]\nstart = "tab"\n', "keys.main.start: 'tab' is Textual's key for focus next"),
    ('[keys.main]\nstart = "f55"\n', "keys.main.start: 'f55' is not a key Textual knows"),
    ('[keys.main]\nstart = "cmd+g"\n', "keys.main.start: 'cmd' is not a modifier"),
])
def test_unknown_ids_and_keys_are_one_line_errors(toml, expected):
    assert expected in _refused(toml)


@pytest.mark.parametrize(("toml", "expected"), [
    ('keys = 3\n', "my.toml: keys: expected a table [keys], found 3 (integer)"),
    ('[keys.main]\nstart = 7\n', "keys.main.start: expected a key such as"),
    ('[keys.main]\nstart = []\n', "keys.main.start: expected a key such as"),
    ('[keys.main]\nstart = "a,b"\n', "keys.main.start: give several keys as an array"),
    ('[kyes]\n', "my.toml: kyes: unknown section; did you mean 'keys'?"),
])
def test_a_malformed_keys_table_is_refused_when_the_config_loads(toml, expected):
    with pytest.raises(ConfigError) as caught:
        parse_config(toml, source="my.toml")
    assert expected in str(caught.value)


def test_key_names_as_a_user_writes_them():
    assert [key_name(k) for k in ("?", "+", "*", "R", "Ctrl+F5", "question_mark", "space")] == \
        ["question_mark", "plus", "asterisk", "R", "ctrl+f5", "question_mark", "space"]


def test_the_ui_refuses_a_conflicting_keymap_in_one_line_before_starting(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[keys.main]\nquit = "s"\n')
    done = subprocess.run([sys.executable, "-m", "epo_tui", "--config", str(config)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr == (f"epo-tui: error: {config}: keys.main.quit: 's' is already the key of main.start "
                           "(main screen); rebind main.start too, or choose another key\n")


def test_a_rebound_key_does_the_action_and_the_old_key_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    config = dataclasses.replace(parse_config('[keys.main]\nstart = "w"\nhelp = "f2"\n'),
                                 feature=FeatureConfig(index=24))
    app = fake_app(config=config)

    async def scenario():
        async with app.run_test(size=(120, 60)) as pilot:
            await ready(pilot)
            await pilot.press("s")  # no longer start
            await pilot.pause(0.3)
            assert app.state == "idle"
            await pilot.press("w")
            await until(pilot, lambda: (app.query_one(StatusBar).fields.get("iteration") or 0) >= 1, "a search")
            await pilot.press("question_mark")  # no longer help
            await pilot.pause(0.2)
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("f2")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
            console = Console(width=120, record=True, file=io.StringIO())
            console.print(app.screen.keys_table())
            palette = {command.title: command.help for command in app.get_system_commands(app.screen)}
            await pilot.press("escape")
            await pilot.press("q")
        return console.export_text(), palette

    text, palette = asyncio.run(scenario())
    key_of = {line.split()[-1]: line.split()[0] for line in text.splitlines() if len(line.split()) >= 3}
    assert (key_of["main.start"], key_of["main.help"], key_of["main.pause"]) == ("w", "f2", "p")
    assert palette["Start"] == "key w" and palette["Help: every key"] == "key f2"

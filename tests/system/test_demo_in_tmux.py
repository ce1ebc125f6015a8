"""End to end in a real 80x24 terminal limited to 256 colours: the installed `epo-tui --demo` in tmux;
pick a feature, start, wait for elites (coloured with 256-colour codes, no 24-bit ones), save a favorite,
see the session in the browser, quit; the favorites file holds the entry and the session is resumable.
Then two such UIs at once on the same cache and data folders (issue 7 §2)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("epo-tui") is None,
                                 reason="needs tmux and the installed epo-tui command")]
SESSION = "epo-tui-e2e"


def _screen(escapes: bool = False, session: str = SESSION) -> str:
    flags = ["-p", "-e"] if escapes else ["-p"]
    return subprocess.run(["tmux", "capture-pane", "-t", session, *flags], capture_output=True, text=True).stdout


def _keys(*keys: str, session: str = SESSION) -> None:
    subprocess.run(["tmux", "send-keys", "-t", session, *keys], check=True)


def _wait_for(text: str, timeout: float = 180, session: str = SESSION, *, pattern_count: int | None = None) -> str:
    """The screen once `text` shows on it; with `pattern_count`, once the regex `text` matches that many
    times (a table's rows are drawn a frame before its columns widen to them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = _screen(session=session)
        if pattern_count is None and text in screen:
            return screen
        if pattern_count is not None and len(re.findall(text, screen)) == pattern_count:
            return screen
        time.sleep(0.5)
    raise AssertionError(f"'{text}' never showed; the screen:\n{_screen(session=session)}")


def _start_demo(tmp_path, session: str = SESSION) -> None:
    """`epo-tui --demo` in a new detached 80x24 tmux session, its folders under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), TERM="xterm-256color", TEXTUAL_COLOR_SYSTEM="256")
    env.pop("COLORTERM", None)
    exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("XDG_", "HF_", "JAX_", "TEXTUAL_")))
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24",
                    f"cd {tmp_path} && env {exports} epo-tui --demo; sleep 60"], check=True, env=env)


def _choose(feature: int, session: str = SESSION) -> None:
    _keys("/", session=session)
    time.sleep(1)  # keys that arrive with the `/` still go to the list, which moves the focus after them
    _keys("-l", f"#{feature}", session=session)
    _wait_for("1 of 2,048 features", session=session)  # the filter has run: enter now jumps
    _keys("Enter", session=session)  # the search box jumps to #N, clears and hands the focus to the list
    _wait_for("2,048 of 2,048 features", session=session)
    _keys("Enter", session=session)
    _wait_for(f"feature {feature} chosen", session=session)


def _until_all_stopped(sessions_dir, count: int) -> list[dict]:
    """Every session's meta once `count` of them are stopped (q stops the worker: checkpointed, resumable)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metas = [json.loads(p.read_text()) for p in sessions_dir.glob("*/session.json")]
        if sum(m["status"] == "stopped" for m in metas) == count:
            return metas
        time.sleep(0.5)
    raise AssertionError("the sessions were not stopped cleanly")


def test_demo_in_tmux_start_favorite_quit(tmp_path):
    _start_demo(tmp_path)
    try:
        _wait_for("features")  # the screen is up (the feature count line)
        _wait_for("ready ·")
        _choose(524)  # the demo's Debian feature
        _keys("s")
        screen = _wait_for("xent  prompt")
        _wait_for("iteration 3/")
        coloured = _screen(escapes=True)
        assert "48;5;" in coloured and "48;2;" not in coloured and "38;2;" not in coloured  # 256 colours only
        _keys("f")
        _wait_for("saved to")
        _keys("o")
        _wait_for("enter open")  # the sessions browser lists the running session
        assert "running" in _screen() and "Debian" in _screen()
        _keys("Escape")
        time.sleep(1)  # an escape followed at once by q reads as alt+q
        _keys("q")
        favorites = tmp_path / "data" / "epo-tui" / "favorites.md"
        deadline = time.monotonic() + 60
        while not favorites.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        text = favorites.read_text()
        assert text.startswith("# epo-tui favorites") and text.count("<!-- epo-tui favorite -->") == 1
        assert "Feature 524" in text and "blocks.2.hook_resid_pre" in text
        assert "feature 524" in screen
        _until_all_stopped(tmp_path / "cache" / "epo-tui" / "sessions", 1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


def test_two_uis_on_one_cache_and_data_folder(tmp_path):
    """Two users' worth of UI on the same folders: each searches its own feature, stars it and saves two
    favorites while the other does the same; every favorite and star lands, each session is whole."""
    ui = ("epo-tui-e2e-a", "epo-tui-e2e-b")
    features = (524, 1293)
    for name in ui:
        _start_demo(tmp_path, name)
    try:
        for name, feature in zip(ui, features):
            _wait_for("ready ·", session=name)
            _choose(feature, session=name)
            _keys("*", session=name)  # star it (stars.json is shared too)
        for name in ui:
            _keys("s", session=name)
        for name in ui:
            _wait_for("iteration 2/", session=name)
        for round_ in range(2):
            for name in ui:
                _keys("f", session=name)
            time.sleep(1)
        for name in ui:  # each browser lists both sessions, both running
            _keys("o", session=name)
            _wait_for("enter open", session=name)
            _wait_for(r"│\s+[0-9a-f]{6}\s+running\s", 60, session=name, pattern_count=2)  # both table rows
            _keys("Escape", session=name)
        time.sleep(1)
        for name in ui:
            _keys("q", session=name)
        metas = _until_all_stopped(tmp_path / "cache" / "epo-tui" / "sessions", 2)
        assert sorted(m["feature"]["indices"][0] for m in metas) == sorted(features)
        favorites = (tmp_path / "data" / "epo-tui" / "favorites.md").read_text()
        assert favorites.count("<!-- epo-tui favorite -->") == 4
        for meta in metas:
            assert favorites.count(f"from session `{meta['id']}`") == 2
        stars = json.loads((tmp_path / "data" / "epo-tui" / "stars.json").read_text())["saes"]
        starred = sorted(int(i) for sae in stars.values() for i, mark in sae.items() if mark.get("star"))
        assert starred == sorted(features), stars
    finally:
        for name in ui:
            subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)

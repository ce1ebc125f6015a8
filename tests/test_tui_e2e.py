"""End to end in a real 80x24 terminal limited to 256 colours: the installed `epo-tui --demo` in tmux;
pick a feature, start, wait for elites (coloured with 256-colour codes, no 24-bit ones), save a favorite,
see the session in the browser, quit; the favorites file holds the entry and the session is resumable."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("epo-tui") is None,
                                 reason="needs tmux and the installed epo-tui command")]
SESSION = "epo-tui-e2e"


def _screen(escapes: bool = False) -> str:
    flags = ["-p", "-e"] if escapes else ["-p"]
    return subprocess.run(["tmux", "capture-pane", "-t", SESSION, *flags], capture_output=True, text=True).stdout


def _keys(*keys: str) -> None:
    subprocess.run(["tmux", "send-keys", "-t", SESSION, *keys], check=True)


def _wait_for(text: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = _screen()
        if text in screen:
            return screen
        time.sleep(0.5)
    raise AssertionError(f"'{text}' never showed; the screen:\n{_screen()}")


def test_demo_in_tmux_start_favorite_quit(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), TERM="xterm-256color", TEXTUAL_COLOR_SYSTEM="256")
    env.pop("COLORTERM", None)
    exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("XDG_", "HF_", "JAX_", "TEXTUAL_")))
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    subprocess.run(["tmux", "new-session", "-d", "-s", SESSION, "-x", "80", "-y", "24",
                    f"cd {tmp_path} && env {exports} epo-tui --demo; sleep 60"], check=True, env=env)
    try:
        _wait_for("features")  # the screen is up (the feature count line)
        _wait_for("ready ·")
        _keys("/")
        _keys("-l", "#524")  # go to the demo's Debian feature, choose it
        _keys("Enter")  # the search box jumps to #524 and hands the focus to the list
        time.sleep(1)
        _keys("Enter")
        _wait_for("feature 524 chosen")
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
        sessions_dir = tmp_path / "cache" / "epo-tui" / "sessions"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # q stops the worker: the session ends checkpointed, resumable
            metas = [p / "session.json" for p in sessions_dir.iterdir()] if sessions_dir.is_dir() else []
            if metas and '"status": "stopped"' in metas[0].read_text():
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the session was not stopped cleanly")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)

"""End to end in a real terminal: the installed `epo-tui --demo` in tmux; start the default feature,
wait for elites, save a favorite, quit; the favorites file holds the entry and the session is resumable."""

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


def _screen() -> str:
    return subprocess.run(["tmux", "capture-pane", "-t", SESSION, "-p"], capture_output=True, text=True).stdout


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
               XDG_CONFIG_HOME=str(tmp_path / "config"), TERM="xterm-256color")
    exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("XDG_", "HF_", "JAX_")))
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    subprocess.run(["tmux", "new-session", "-d", "-s", SESSION, "-x", "100", "-y", "30",
                    f"cd {tmp_path} && env {exports} epo-tui --demo; sleep 60"], check=True, env=env)
    try:
        _wait_for("features")  # the screen is up (the feature count line)
        _wait_for("ready ·")
        subprocess.run(["tmux", "send-keys", "-t", SESSION, "s"], check=True)
        screen = _wait_for("xent  prompt")
        _wait_for("iteration 3/")
        subprocess.run(["tmux", "send-keys", "-t", SESSION, "f"], check=True)
        _wait_for("saved to")
        subprocess.run(["tmux", "send-keys", "-t", SESSION, "q"], check=True)
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

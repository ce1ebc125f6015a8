"""The Textual app driven by a pilot, with a real worker on the tiny model: the screen is up before
the worker is ready, features arrive, `s` starts a search whose elites show, `p` pauses, `f` saves a
favorite, `q` quits and leaves the session resumable; a killed worker is reported and `R` resumes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from textual.widgets import Input

from epo_tui import favorites, sessions
from epo_tui.protocol import Injected
from epo_tui.tui.components.elites import ElitesPane
from epo_tui.tui.components.features import FeaturePane
from epo_tui.tui.components.status import StatusBar, eta_text
from epo_tui.tui.screens.prompts import PromptEditor, Scratchpad
from tui_pilot import tiny_app

TIMEOUT = 120.0


async def _until(pilot, condition, timeout: float = TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def test_eta_text():
    assert eta_text(10, 100, 2.0) == "ETA 45s"
    assert eta_text(0, 1000, 0.5) == ""
    assert eta_text(10, 7210, 1.0) == "ETA 2h00m"
    assert eta_text(100, 100, 3.0) == ""


def test_start_pause_favorite_quit(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = tiny_app(tiny_dir)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            status = app.query_one(StatusBar)
            assert status.fields.get("state") in ("starting the worker", "loading the model and SAE",
                                                  "loading: model and SAE", "idle")  # up before the worker
            await _until(pilot, lambda: app.ready is not None and app.query_one(FeaturePane).entries,
                         what="the features")
            pane = app.query_one(FeaturePane)  # the tiny SAE ships its densities: `r` knows which fire
            assert pane.alive is not None and pane.alive == {e.index for e in pane.entries if e.alive}
            await pilot.press("s")
            await _until(pilot, lambda: app.query_one(ElitesPane).selected_elite is not None
                         and (status.fields.get("iteration") or 0) >= 2, what="elites")
            await pilot.press("p")
            await _until(pilot, lambda: app.state == "paused", what="pause")
            await pilot.press("t")  # the scratchpad scores as you type
            await _until(pilot, lambda: isinstance(app.screen, Scratchpad), what="the scratchpad")
            await pilot.press("h", "e", "l", "l", "o")
            await _until(pilot, lambda: app.screen.last_scored is not None, what="the scratchpad's score")
            assert "".join(app.screen.last_scored.tokens[1:]) == "hello"
            await pilot.press("escape")
            await pilot.press("e")  # edit the selected elite and inject it
            await _until(pilot, lambda: isinstance(app.screen, PromptEditor), what="the editor")
            editor = app.screen.query_one(Input)
            editor.value = "hello world"
            await pilot.press("enter")
            await _until(pilot, lambda: app.client.bus.latest(Injected) is not None, what="the injection")
            assert app.client.bus.latest(Injected).text.startswith("hello")
            await pilot.press("f")
            path = favorites.favorites_path(app.config)
            await _until(pilot, lambda: path.exists() and favorites.read_favorites(path), what="the favorite")
            session_id = app.session.session
            assert session_id in favorites.read_favorites(path)[-1]
            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert {"Start", "Pause", "Stop", "Favorite", "Copy", "Quit", "Feature: Star"} <= titles  # the palette
            await pilot.press("q")
            await _until(pilot, lambda: not app.is_running, what="the app to exit", timeout=30)
        return session_id

    session_id = asyncio.run(scenario())
    meta = sessions.find_session(session_id).read_meta()
    assert meta["status"] == "stopped" and meta["checkpoint_iteration"] >= 2


@pytest.mark.slow
def test_a_killed_worker_is_reported_and_R_resumes(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = tiny_app(tiny_dir)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            status = app.query_one(StatusBar)
            await _until(pilot, lambda: app.ready is not None, what="ready")
            await pilot.press("s")
            await _until(pilot, lambda: (status.fields.get("iteration") or 0) >= 3, what="progress")
            session_id = app.session.session
            os.kill(app.client.pid, signal.SIGKILL)
            checkpointed = sessions.find_session(session_id).read_meta()["checkpoint_iteration"]
            await _until(pilot, lambda: app.worker_dead, what="the death notice")
            assert "restart" in status.fields["state"]
            app.clear_notifications()
            await pilot.press("o")  # the sessions are the worker's: with none running, say so
            await _until(pilot, lambda: app._notifications, what="the sessions notice")
            assert [n.message for n in app._notifications] == [
                "the sessions are the worker's, and it is not running: R restarts it"]
            assert app.screen is app.screen_stack[0]
            await pilot.press("R")
            await _until(pilot, lambda: not app.worker_dead and app.state == "running", what="the resume")
            assert app.session.session == session_id and app.session.iteration == checkpointed
            await pilot.press("q")
            await _until(pilot, lambda: not app.is_running, what="exit", timeout=30)

    asyncio.run(scenario())

"""Issue 7 §2 seen from the UI: a session folder deleted under a running UI, and a sessions browser that
is closed or finds its session gone while it reads. The user is told in one notification, the app keeps
running, and nothing is recreated on disk.

The worker's side of the same faults (events, files, a full disk) is tests/system/test_faults.py.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
from textual.app import App

from epo_tui import favorites, sessions
from epo_tui.tui.components.elites import ElitesPane
from epo_tui.tui.components.status import StatusBar
from epo_tui.tui.screens.sessions import SessionsScreen
from tui_pilot import InProcessSessions, search_until, tiny_app, until

TIMEOUT = 120.0


def _messages(app: App) -> list[str]:
    return [str(n.message) for n in app._notifications]


def test_a_session_folder_deleted_under_the_running_ui(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = tiny_app(tiny_dir)

    async def scenario():
        async with app.run_test(size=(100, 30)) as pilot:
            status = app.query_one(StatusBar)
            gone = await search_until(pilot, 2, TIMEOUT)
            folder = sessions.find_session(gone).folder
            # as `epo-tui sessions delete --force ID` from another shell
            await asyncio.to_thread(sessions.delete_session, gone, folder.parent, True)
            await until(pilot, lambda: any("folder was deleted" in m for m in _messages(app)),
                        "the notification", TIMEOUT)
            await until(pilot, lambda: app.state == "idle", "the worker to go idle", TIMEOUT)
            told = [m for m in _messages(app) if "folder was deleted" in m]
            assert len(told) == 1 and gone in told[0] and "the search stopped at iteration" in told[0]
            assert "\n" not in told[0]
            assert not folder.exists()  # nothing brought it back

            # what was on screen stays usable: the elites shown can still be saved as favorites
            assert app.query_one(ElitesPane).selected_elite is not None
            await pilot.press("f")
            path = favorites.favorites_path(app.config)
            await until(pilot, lambda: path.exists() and favorites.read_favorites(path), "the favorite", TIMEOUT)

            app.clear_notifications()
            await pilot.press("s")  # and a new search runs
            await until(pilot, lambda: app.session is not None and app.session.session != gone
                        and (status.fields.get("iteration") or 0) >= 1, "a new search", TIMEOUT)
            fresh = app.session.session
            await pilot.press("o")  # the browser lists the new session, not the deleted one
            await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, "the list")
            listed = set(app.screen.rows)
            await pilot.press("escape")
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, "the app to exit", 30)
        return fresh, listed

    fresh, listed = asyncio.run(scenario())
    assert fresh in listed and all(sessions.find_session(s).folder.exists() for s in listed)
    assert sessions.find_session(fresh).read_meta()["status"] == "stopped"


class Host(App):
    def __init__(self, root: Path):
        super().__init__()
        self.root, self.results = root, []

    def on_mount(self) -> None:
        self.push_screen(SessionsScreen(InProcessSessions(self.root)), callback=self.results.append)


def _two_sessions(root: Path, monkeypatch) -> list[sessions.Session]:
    """Two sessions with checkpoints, the second newer (listed first)."""
    monkeypatch.setattr(sessions, "new_session_id", iter(["20261125-100000-aaaaaa", "20261125-110000-bbbbbb"]).__next__)
    made = []
    for label in ("first", "second"):
        session = sessions.create_session({"config": {}, "lambdas": [1.0], "label": label, "model": "m",
                                           "feature": {"indices": [3]}, "sae": {"name": "s", "hook": "h"},
                                           "iterations_total": 10}, root)
        elite = {"token_ids": [0, 7], "tokens": ["<bos>", " x"], "activations": [0.0, 1.0], "act": 1.0,
                 "xent": 2.0, "objective": -1.0, "penalty": 1.0, "prompt_start": 1, "text": " x"}
        session.write_checkpoint({"tokens_KxN": np.zeros((1, 1), np.int32)}, 5, [elite])
        made.append(session)
    return made


def test_a_read_that_returns_to_a_dismantled_browser_is_dropped(tmp_path, monkeypatch):
    """The highlighted session's elites are read in a thread. When the app quits with the browser open,
    Textual removes the screen's widgets before it cancels the screen's workers, and a read ending in
    between found no table (NoMatches: a traceback at exit, seen under load). The window is made wide
    here: the widgets go while the read is held, then it returns."""
    root = tmp_path / "sessions"
    _two_sessions(root, monkeypatch)
    entered, release = threading.Event(), threading.Event()
    real = sessions.Session.read_elites

    def held_read(self):
        entered.set()
        release.wait(10)
        return real(self)
    monkeypatch.setattr(sessions.Session, "read_elites", held_read)

    async def scenario():
        app = Host(root)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, "the list")
            await until(pilot, entered.is_set, "the read to start")
            screen = app.screen
            await screen.query_one("#sessions-table").remove()
            await screen.query_one("#sessions-details").remove()
            release.set()
            await until(pilot, lambda: not screen.workers._workers or all(
                w.is_finished for w in screen.workers._workers), "the read to end")
            assert app.is_running and app._exception is None
            app.exit()
        return app.return_code

    assert asyncio.run(scenario()) == 0


def test_a_session_deleted_while_the_browser_shows_it(tmp_path, monkeypatch):
    root = tmp_path / "sessions"
    first, second = _two_sessions(root, monkeypatch)

    async def scenario():
        app = Host(root)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, "the list")
            assert app.screen.highlighted_id() == second.id  # newest first
            sessions.delete_session(second.id, root=root, force=True)  # as `epo-tui sessions delete` does
            await pilot.press("enter")
            await until(pilot, lambda: _messages(app), "the notification")
            refused = _messages(app)
            await pilot.press("r")
            await until(pilot, lambda: len(_messages(app)) > 1, "the second notification")
            refused_resume = _messages(app)[-1]
            assert isinstance(app.screen, SessionsScreen) and app.results == []  # still browsing
            await pilot.press("down", "enter")  # the other session still opens
            await until(pilot, lambda: app.results, "the other session to open")
        return refused, refused_resume, app.results

    refused, refused_resume, results = asyncio.run(scenario())
    assert len(refused) == 1 and "the session folder is gone" in refused[0] and "\n" not in refused[0]
    assert "the session folder is gone" in refused_resume
    assert results[0].action == "open" and results[0].session_id == first.id
    assert not second.folder.exists()


def test_a_full_disk_when_saving_a_favorite_is_told_and_keeps_the_file(tmp_path, monkeypatch):
    import errno
    import os

    from epo_tui.tui.components.status import StatusBar
    from tui_pilot import fake_app, ready

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    app = fake_app()
    no_space = os.strerror(errno.ENOSPC)

    async def scenario():
        async with app.run_test(size=(120, 34)) as pilot:
            await ready(pilot)
            await pilot.press("s")
            await until(pilot, lambda: (app.query_one(StatusBar).fields.get("iteration") or 0) == 5, "progress")
            await pilot.press("f")
            path = favorites.favorites_path(app.config)
            await until(pilot, lambda: path.exists() and favorites.read_favorites(path), "the first favorite")
            before = path.read_bytes()
            real_fsync = os.fsync

            def full(fd):  # the favorites file's atomic rewrite finds the disk full
                if "favorites.md" in os.readlink(f"/proc/self/fd/{fd}"):
                    raise OSError(errno.ENOSPC, no_space)
                return real_fsync(fd)
            monkeypatch.setattr(os, "fsync", full)
            app.clear_notifications()
            await pilot.press("f")
            await until(pilot, lambda: _messages(app), "the notification")
            told = _messages(app)
            monkeypatch.setattr(os, "fsync", real_fsync)
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, "the app to exit")
        return told, before, path

    told, before, path = asyncio.run(scenario())
    assert len(told) == 1 and no_space in told[0] and "favorites.md" in told[0], told
    assert path.read_bytes() == before and len(favorites.read_favorites(path)) == 1
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

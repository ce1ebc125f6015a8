"""The sessions browser (`o`): real session folders written with epo_tui.sessions (no engine), shown in a
tiny host app; what the user sees, what each key returns, and what it refuses."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest
from textual.app import App
from textual.widgets import DataTable, Static

from epo_tui import sessions
from epo_tui.sessions import create_session
from epo_tui.tui.screens.sessions import EMPTY_TEXT, SessionChoice, SessionsScreen
from tui_pilot import InProcessSessions

PENDING = "pending"  # the host's result before the screen is dismissed
OLD, MIDDLE, NEW = "20261125-100000-aaaaaa", "20261125-110000-bbbbbb", "20261125-120000-cccccc"


def _meta(features: list[int], **extra) -> dict:
    return {"config": {"search": {"seed": 0}}, "model": "org/tiny-gpt2",
            "sae": {"name": "tiny-res-sae", "hook": "blocks.1.hook_resid_pre"},
            "feature": {"kind": "sae", "indices": features, "combine": "lp"}, "lambdas": [1.0, 20.0],
            "iterations_total": 100, **extra}


def _elite(text: str, act: float, xent: float = 3.0) -> dict:
    tokens = ["<bos>", text]
    return {"penalty": 1.0, "token_ids": [0, 7], "tokens": tokens, "activations": [0.0, act], "act": act,
            "xent": xent, "objective": act - xent, "prompt_start": 1, "text": text}


def _checkpoint(session: sessions.Session, iteration: int, elites: list[dict]) -> None:
    session.write_checkpoint({"tokens_KxN": np.zeros((2, 4), np.int32)}, iteration, elites)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def three_sessions(root, monkeypatch) -> dict[str, sessions.Session]:
    """OLD finished with 7 elites and a history; MIDDLE killed while running (interrupted, no checkpoint);
    NEW stopped with a checkpoint and an error."""
    monkeypatch.setattr(sessions, "new_session_id", iter([OLD, MIDDLE, NEW]).__next__)
    old = create_session(_meta([234]), root)
    elites = [_elite(f" e{k}", act=float(k)) for k in range(6)] + [_elite(" \x1b[31mred", act=9.5, xent=1.25)]
    _checkpoint(old, 100, elites)
    old.append_history([{"iteration": 3, "xent": 2.0, "objective": 1.0, "act": 3.0, "token_ids": [7], "text": " a"},
                        {"iteration": 9, "xent": 1.5, "objective": 2.0, "act": 3.5, "token_ids": [8], "text": " b"}])
    old.update_meta(status="finished", iteration=100, label="bridges")
    middle = create_session(_meta([1, 2]), root)
    middle.update_meta(iteration=5)
    new = create_session(_meta([42]), root)
    _checkpoint(new, 40, [_elite(" x", 1.0)])
    new.update_meta(status="stopped", iteration=40, error="out of memory\x1b[2J")
    return {OLD: old, MIDDLE: middle, NEW: new}


class Host(App):
    """Pushes the browser at start and keeps what it was dismissed with."""

    def __init__(self, root: Path):
        super().__init__()
        self.root, self.result = root, PENDING

    def on_mount(self) -> None:
        self.push_screen(SessionsScreen(InProcessSessions(self.root)), callback=self.chosen)

    def chosen(self, choice: SessionChoice | None) -> None:
        self.result = choice


async def _until(pilot, condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("timed out waiting for the screen")


def _browse(root: Path, script) -> tuple[object, dict]:
    """Runs the host, waits for the list, runs `script(pilot, screen, seen)`; returns (result, seen)."""
    seen: dict = {}

    async def run():
        app = Host(root)
        async with app.run_test(size=(140, 50)) as pilot:
            await _until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
            await script(pilot, app.screen, seen)
        return app.result

    return asyncio.run(run()), seen


def _rows(screen: SessionsScreen) -> list[list[str]]:
    table = screen.query_one("#sessions-table", DataTable)
    return [[getattr(c, "plain", str(c)) for c in table.get_row_at(i)] for i in range(table.row_count)]


def _text(screen: SessionsScreen, selector: str) -> str:
    content = screen.query_one(selector, Static).content
    return getattr(content, "plain", str(content))


async def _details_with_elites(pilot, screen: SessionsScreen) -> str:
    await _until(pilot, lambda: "reading elites" not in _text(screen, "#sessions-details"))
    return _text(screen, "#sessions-details")


def test_rows_newest_first_with_shown_status_and_details(root, three_sessions):
    async def script(pilot, screen, seen):
        seen["rows"] = _rows(screen)
        seen["first"] = await _details_with_elites(pilot, screen)
        await pilot.press("down", "down")
        await _until(pilot, lambda: OLD in _text(screen, "#sessions-details"))
        seen["old"] = await _details_with_elites(pilot, screen)
        seen["empty_shown"] = screen.query_one("#sessions-empty").display
        seen["problems_shown"] = screen.query_one("#sessions-problems").display

    result, seen = _browse(root, script)
    assert result == PENDING
    assert [(r[0], r[1], r[2], r[3]) for r in seen["rows"]] == [
        ("cccccc", "stopped", "42", "40/100"),
        ("bbbbbb", "interrupted", "1+2", "5/100"),  # marked running, but no process holds it
        ("aaaaaa", "finished", "234 bridges", "100/100")]
    assert seen["rows"][2][5] == "tiny-gpt2 · tiny-res-sae"
    assert seen["empty_shown"] is False and seen["problems_shown"] is False

    first = seen["first"]
    assert "error: out of memory\\x1b[2J" in first and "\x1b" not in first
    assert "best elites (of 1)" in first and "act 1.000  xent 3.000   x" in first

    old = seen["old"]
    assert "label: bridges" in old
    assert "model org/tiny-gpt2 · SAE tiny-res-sae at blocks.1.hook_resid_pre" in old
    assert "finished" in old and "error" not in old
    elite_lines = [line.strip() for line in old.splitlines() if line.startswith("  act")]
    assert elite_lines == ["act 9.500  xent 1.250   \\x1b[31mred", "act 5.000  xent 3.000   e5",
                           "act 4.000  xent 3.000   e4", "act 3.000  xent 3.000   e3", "act 2.000  xent 3.000   e2"]
    assert "\x1b" not in old


def test_a_running_session_whose_runner_holds_the_lock_shows_running(root, three_sessions):
    lock = three_sessions[MIDDLE].claim()
    try:
        async def script(pilot, screen, seen):
            seen["rows"] = _rows(screen)
        _, seen = _browse(root, script)
    finally:
        lock.release()
    assert [r[1] for r in seen["rows"]] == ["stopped", "running", "finished"]


def test_down_then_enter_opens_with_its_elites_and_frontier(root, three_sessions):
    async def script(pilot, screen, seen):
        await pilot.press("down", "down", "enter")
        await _until(pilot, lambda: pilot.app.result != PENDING)

    choice, _ = _browse(root, script)
    old = three_sessions[OLD]
    assert isinstance(choice, SessionChoice)
    assert (choice.action, choice.session_id) == ("open", OLD)
    assert choice.meta == old.read_meta() and choice.meta["label"] == "bridges"
    assert choice.elites == old.read_elites() and len(choice.elites) == 7
    # the history as a chart needs it: iteration 9's point dominates iteration 3's, which stays only as
    # that iteration's best act (without its text)
    recorded = old.read_history()[0]
    assert [p.to_json() for p in choice.history] == [{**recorded[0], "text": "", "token_ids": []}, recorded[1]]


def test_r_resumes_a_session_with_a_checkpoint(root, three_sessions):
    async def script(pilot, screen, seen):
        await pilot.press("r")
        await _until(pilot, lambda: pilot.app.result != PENDING)

    choice, _ = _browse(root, script)
    assert (choice.action, choice.session_id, choice.elites, choice.history) == ("resume", NEW, [], [])
    assert choice.meta["status"] == "stopped"


def test_r_is_refused_while_another_process_runs_it_or_without_a_checkpoint(root, three_sessions):
    lock = three_sessions[NEW].claim()  # another runner holds the session
    try:
        async def script(pilot, screen, seen):
            await pilot.press("r")
            await _until(pilot, lambda: pilot.app._notifications)
            seen["refused"] = [n.message for n in pilot.app._notifications]
            pilot.app.clear_notifications()
            await pilot.press("down", "r")  # MIDDLE: no checkpoint yet
            await _until(pilot, lambda: pilot.app._notifications)
            seen["no_checkpoint"] = [n.message for n in pilot.app._notifications]
            await pilot.pause(0.1)
            seen["still_open"] = isinstance(pilot.app.screen, SessionsScreen)

        result, seen = _browse(root, script)
    finally:
        lock.release()
    assert result == PENDING and seen["still_open"]
    assert "being run by another process" in seen["refused"][0]
    assert "no checkpoint yet" in seen["no_checkpoint"][0]


@pytest.mark.parametrize("key", ["escape", "q"])
def test_escape_and_q_close_with_none(root, three_sessions, key):
    async def script(pilot, screen, seen):
        await pilot.press(key)
        await _until(pilot, lambda: pilot.app.result != PENDING)

    result, _ = _browse(root, script)
    assert result is None


def test_a_damaged_session_is_a_problem_line_and_the_rest_still_list(root, three_sessions):
    (root / MIDDLE / "session.json").write_text('{"ve')

    async def script(pilot, screen, seen):
        seen["rows"] = _rows(screen)
        seen["problems"] = _text(screen, "#sessions-problems")
        seen["problems_shown"] = screen.query_one("#sessions-problems").display

    _, seen = _browse(root, script)
    assert [r[0] for r in seen["rows"]] == ["cccccc", "aaaaaa"]
    assert seen["problems_shown"]
    assert seen["problems"].startswith(f"skipped a damaged session: {MIDDLE}: session.json: not valid JSON")


def test_the_title_names_the_workers_host(root, three_sessions):
    async def script(pilot, screen, seen):
        seen["title"] = _text(screen, "#sessions-title")

    _, seen = _browse(root, script)
    assert seen["title"] == f"sessions on {socket.gethostname()}: 3, newest first"


def test_an_empty_cache_says_no_sessions_yet(root):
    async def script(pilot, screen, seen):
        seen["empty"] = _text(screen, "#sessions-empty")
        seen["empty_shown"] = screen.query_one("#sessions-empty").display
        seen["table_shown"] = screen.query_one("#sessions-table").display
        await pilot.press("enter", "r")  # nothing to open or resume: no crash, no dismiss
        await pilot.pause(0.05)

    result, seen = _browse(root, script)
    assert result == PENDING
    assert seen["empty"] == EMPTY_TEXT and seen["empty_shown"] and not seen["table_shown"]

"""SVG snapshots of the main screen, driven by the protocol-speaking fake worker (tests/fake_worker.py `ui`):
empty (features listed, no search), searching, finished, in error (the worker died), and searching at
80x24; and of every modal screen over it: edit & inject (`e`), the scratchpad (`t`), an elite's details
(`d`), the sessions browser (`o`), the search settings (`S`), a latent's note (`n`) and the help (`F1`); and
the main screen with keys rebound in the config's `[keys]`, and beside a latent's dataset statistics. A change in what
the screen shows fails here; review the diff, then update with
`python -m pytest tests/tui/test_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from textual.screen import ModalScreen
from textual.widgets import Input

from epo_tui import sessions
from epo_tui.config import FeatureConfig, parse_config
from epo_tui.tui.app import EpoApp
from epo_tui.tui.components.elites import ElitesPane
from epo_tui.tui.components.features import FeatureList
from epo_tui.tui.components.frontier import FrontierPane
from epo_tui.tui.components.status import StatusBar
from epo_tui.tui.screens.sessions import SessionsScreen
from tui_pilot import fake_app, ready, until, write_fake_dataset


async def _settled(pilot, keep_notifications: bool = False) -> None:
    """Past the frontier's redraw timer and any pending layout, so the frame is the final one; short-lived
    toasts are cleared (whether one is still up depends on timing), long-lived ones can be kept."""
    frontier = pilot.app.query_one(FrontierPane)
    await until(pilot, lambda: not frontier._dirty, "the frontier's redraw")
    await pilot.pause(0.3)
    if not keep_notifications:
        pilot.app.clear_notifications()
        await pilot.pause(0.1)


def _iteration(app: EpoApp) -> int:
    return app.query_one(StatusBar).fields.get("iteration") or 0


async def _searching(pilot) -> None:
    await ready(pilot)
    await pilot.press("s")
    await until(pilot, lambda: _iteration(pilot.app) == 5 and pilot.app.query_one(ElitesPane).elites,
                 "five iterations")
    await _settled(pilot)


@pytest.mark.slow
def test_empty(snap_compare):
    async def run_before(pilot):
        await ready(pilot)
        await _settled(pilot)

    assert snap_compare(fake_app(), terminal_size=(120, 34), run_before=run_before)


@pytest.mark.slow
def test_searching(snap_compare):
    assert snap_compare(fake_app(), terminal_size=(120, 34), run_before=_searching)


@pytest.mark.slow
def test_searching_at_80x24(snap_compare):
    assert snap_compare(fake_app(), terminal_size=(80, 24), run_before=_searching)


@pytest.mark.slow
def test_finished(snap_compare):
    async def run_before(pilot):
        await _searching(pilot)
        await until(pilot, lambda: pilot.app.state == "idle", "the end of the search")
        await _settled(pilot)

    assert snap_compare(fake_app("finish"), terminal_size=(120, 34), run_before=run_before)


@pytest.mark.slow
def test_worker_died(snap_compare):
    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("s")
        await until(pilot, lambda: pilot.app.worker_dead, "the death notice")
        await _settled(pilot, keep_notifications=True)  # the error toast stays up for a minute

    assert snap_compare(fake_app("die"), terminal_size=(120, 34), run_before=run_before)


async def _modal(pilot, *keys: str) -> None:
    """Presses `keys` and waits for the modal screen they open to be up and settled. Its text cursors stop
    blinking (shown steadily): a blink caught half-way would make the frame depend on timing."""
    await pilot.press(*keys)
    await until(pilot, lambda: isinstance(pilot.app.screen, ModalScreen), "the modal screen")
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause(0.3)
    pilot.app.clear_notifications()
    await pilot.pause(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["e", "d"])
def test_an_elite_edited_and_in_detail(snap_compare, key):
    async def run_before(pilot):
        await _searching(pilot)
        await _modal(pilot, key)

    assert snap_compare(fake_app(), terminal_size=(120, 34), run_before=run_before)


@pytest.mark.slow
def test_the_scratchpad(snap_compare):
    async def run_before(pilot):
        await ready(pilot)
        await _modal(pilot, "t")
        await pilot.press(*"fire here")
        await until(pilot, lambda: str(pilot.app.screen.query_one("#scratch-result").render()).strip(), "the score")
        await pilot.pause(0.3)

    assert snap_compare(fake_app(), terminal_size=(120, 34), run_before=run_before)


@pytest.mark.slow
def test_the_search_settings(snap_compare):
    async def run_before(pilot):
        await ready(pilot)
        await _modal(pilot, "S")

    assert snap_compare(fake_app(), terminal_size=(120, 40), run_before=run_before)


@pytest.mark.slow
def test_the_help_screen(snap_compare):
    async def run_before(pilot):
        await ready(pilot)
        await _modal(pilot, "f1")

    assert snap_compare(fake_app(), terminal_size=(120, 60), run_before=run_before)


@pytest.mark.slow
def test_searching_beside_the_dataset(snap_compare, tmp_path, monkeypatch):
    """The chosen latent's dataset examples under the elites (one colour scale), its maximum as the
    frontier's line with the elites above it starred, and the status bar's ratio."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    write_fake_dataset()
    assert snap_compare(fake_app(), terminal_size=(120, 40), run_before=_searching)


@pytest.mark.slow
def test_keys_rebound_in_the_config(snap_compare):
    """The footer shows the config's keys (start on w, stop on F8), and they work: w started this search.
    Textual's keymap puts rebound keys at the footer's end, hence the wider terminal."""
    config = dataclasses.replace(parse_config('[keys.main]\nstart = "w"\nstop = "F8"\n'),
                                 feature=FeatureConfig(index=24))

    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("w")
        await until(pilot, lambda: _iteration(pilot.app) == 5 and pilot.app.query_one(ElitesPane).elites,
                    "five iterations")
        await _settled(pilot)

    assert snap_compare(fake_app(config=config), terminal_size=(170, 34), run_before=run_before)


@pytest.mark.slow
def test_a_latents_note(snap_compare):
    async def run_before(pilot):
        await ready(pilot)
        pilot.app.query_one(FeatureList).focus()
        await _modal(pilot, "n")

    assert snap_compare(fake_app(), terminal_size=(120, 34), run_before=run_before)


def _fixed_session(root, monkeypatch, session_id: str, status: str, label: str, feature: int, act: float) -> None:
    """A session as a worker leaves it, with fixed times (the snapshot must not depend on the clock)."""
    monkeypatch.setattr(sessions, "new_session_id", lambda: session_id)
    session = sessions.create_session({"config": {}, "lambdas": [1.0], "label": label, "model": "demo/model",
                                       "feature": {"indices": [feature]},
                                       "sae": {"name": "demo/sae", "hook": "blocks.2.hook_resid_pre"},
                                       "iterations_total": 100}, root)
    elite = {"penalty": 1.0, "token_ids": [0, 7, 8], "tokens": ["<|endoftext|>", " Debian", " packages"],
             "activations": [0.0, act / 2, act], "act": act, "xent": 4.25, "objective": act - 4.25,
             "prompt_start": 1, "text": " Debian packages"}
    session.write_checkpoint({"tokens_KxN": np.zeros((1, 2), np.int32)}, 40, [elite])
    meta = json.loads((session.folder / sessions.META_FILE).read_text())
    meta.update(status=status, iteration=40, checkpoint_iteration=40, created="2026-11-25T10:00:00+00:00",
                updated="2026-11-25T10:30:00+00:00")
    (session.folder / sessions.META_FILE).write_text(json.dumps(meta))


@pytest.mark.slow
def test_the_sessions_browser(snap_compare, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the fake worker's sessions folder: these two only
    monkeypatch.setenv("FAKE_WORKER_HOST", "tpu-vm-0")
    root = tmp_path / "epo-tui" / "sessions"
    _fixed_session(root, monkeypatch, "20261125-100000-aaaaaa", "finished", "Debian packaging", 524, 12.5)
    _fixed_session(root, monkeypatch, "20261125-110000-bbbbbb", "stopped", "legalization", 234, 3.25)

    async def run_before(pilot):
        await ready(pilot)
        await _modal(pilot, "o")
        await until(pilot, lambda: isinstance(pilot.app.screen, SessionsScreen) and pilot.app.screen.loaded
                    and "best elites" in str(pilot.app.screen.query_one("#sessions-details").render()),
                    "the sessions and the first one's elites")
        await pilot.pause(0.3)

    assert snap_compare(fake_app(), terminal_size=(120, 34), run_before=run_before)

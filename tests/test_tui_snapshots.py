"""SVG snapshots of the main screen, driven by the protocol-speaking fake worker (tests/fake_worker.py `ui`):
empty (features listed, no search), searching, finished, in error (the worker died), and searching at
80x24. A change in what the screen shows fails here; review the diff, then update with
`python -m pytest tests/test_tui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import pytest

from epo_tui.tui.app import EpoApp
from epo_tui.tui.components.elites import ElitesPane
from epo_tui.tui.components.frontier import FrontierPane
from epo_tui.tui.components.status import StatusBar
from tui_pilot import fake_app, ready, until


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

"""Load (issue 7 §3): a search of 2,000 iterations with the UI attached keeps memory flat.

The Textual app runs in this process (`app.run_test()`, headless) with a real worker on the tiny model.
About every 100 iterations the test samples the worker's resident set size (/proc/PID/status VmRSS),
this process's (the UI's), the frontier pane's ParetoFrontier and BestHistory sizes and the client bus's
backlog. It then asserts flatness with generous bounds:

- RSS growth from iteration ~500 to 2,000 stays below max(32 MiB, 10 % of the RSS at ~500), for each
  process. Iteration 500 rather than 0: JAX compiles, caches fill and the allocator settles during the
  first hundreds of iterations; a leak of even 20 KiB per iteration (a progress event or a frontier point
  kept per iteration) would still show as 30 MiB over the last 1,500.
- the frontier and the history stay within FRONTIER_MAX_POINTS and HISTORY_MAX_POINTS, and the bus's
  subscriptions within their limit.

Nothing is timed. The samples are printed as a table (`pytest -s` shows it) and written as JSON to the
path in the environment variable EPO_TUI_LOAD_REPORT when it is set; EPO_TUI_LOAD_ITERATIONS
changes the search's length (default 2,000).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from epo_tui.bus import SUBSCRIPTION_LIMIT
from epo_tui.config import load_config
from epo_tui.protocol import Finished
from epo_tui.tui.app import EpoApp, LoadSpec
from epo_tui.pareto import FRONTIER_MAX_POINTS
from epo_tui.tui.components.frontier import HISTORY_MAX_POINTS, FrontierPane
from epo_tui.tui.components.status import StatusBar

ITERATIONS = int(os.environ.get("EPO_TUI_LOAD_ITERATIONS", "2000"))  # longer runs: a leak check
SAMPLE_EVERY = 100
BASELINE_ITERATION = 500
MIB = 1 << 20
GROWTH_FLOOR = 32 * MIB
GROWTH_SHARE = 0.10
TIMEOUT_S = 1200.0  # a hang guard only: the tiny search takes well under a minute here


def rss_bytes(pid: int | str = "self") -> int:
    """The resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def allowed_growth(base: int) -> int:
    return max(GROWTH_FLOOR, int(GROWTH_SHARE * base))


def _app(tiny_dir: Path) -> EpoApp:
    config = load_config(str(tiny_dir / "config.toml"))
    config = dataclasses.replace(config, search=dataclasses.replace(config.search, iterations=ITERATIONS))
    return EpoApp(config, LoadSpec.of(config, demo=False))


def _table(samples: list[dict]) -> str:
    head = f"{'iter':>5} {'worker MiB':>10} {'UI MiB':>8} {'frontier':>8} {'history':>7} {'backlog':>7} {'dropped':>7}"
    rows = [f"{s['iteration']:>5} {s['worker_rss'] / MIB:>10.1f} {s['ui_rss'] / MIB:>8.1f} "
            f"{s['frontier']:>8} {s['history']:>7} {s['bus_backlog']:>7} {s['bus_dropped']:>7}" for s in samples]
    return "\n".join([head, *rows])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_2000_iterations_with_the_ui_keep_memory_flat(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = _app(tiny_dir)
    samples: list[dict] = []

    def sample(iteration: int) -> None:
        pane = app.query_one(FrontierPane)
        subscriptions = list(app.client.bus._subscriptions)
        samples.append({
            "iteration": iteration, "worker_rss": rss_bytes(app.client.pid), "ui_rss": rss_bytes(),
            "frontier": len(pane.frontier), "history": len(pane.history),
            "bus_backlog": max((s.backlog for s in subscriptions), default=0),
            "bus_dropped": sum(s.dropped for s in subscriptions), "subscriptions": len(subscriptions),
            "time": time.monotonic()})

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            status = app.query_one(StatusBar)
            deadline = time.monotonic() + TIMEOUT_S

            async def until(condition, what: str) -> None:
                while not condition():
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    await pilot.pause(0.02)

            await until(lambda: app.ready is not None and app.chosen is not None, "the features")
            await pilot.press("s")
            await until(lambda: app.session is not None, "the search to start")
            session = app.session.session
            sample(0)
            mark = SAMPLE_EVERY
            finished = lambda: getattr(app.client.bus.latest(Finished), "session", None) == session  # noqa: E731
            while not finished():
                assert app.client.running, "the worker died"
                assert time.monotonic() < deadline, "timed out waiting for the search to finish"
                iteration = status.fields.get("iteration") or 0
                if iteration >= mark:
                    sample(iteration)
                    mark = (iteration // SAMPLE_EVERY + 1) * SAMPLE_EVERY
                await pilot.pause(0.01)
            await pilot.pause(0.5)  # the last progress events and a redraw
            sample(app.client.bus.latest(Finished).iteration)
            assert app.client.bus.latest(Finished).status == "finished"
            await pilot.press("q")
            await until(lambda: not app.is_running, "the app to exit")

    asyncio.run(scenario())

    start = samples[0]["time"]
    for s in samples:
        s["seconds"] = round(s.pop("time") - start, 2)
    print(f"\n{ITERATIONS} iterations of the tiny search with the UI attached:\n{_table(samples)}")
    report = os.environ.get("EPO_TUI_LOAD_REPORT")
    if report:
        Path(report).write_text(json.dumps({"iterations": ITERATIONS, "samples": samples}, indent=1) + "\n")

    assert samples[-1]["iteration"] == ITERATIONS
    base = min((s for s in samples if s["iteration"] >= BASELINE_ITERATION), key=lambda s: s["iteration"])
    assert base["iteration"] < ITERATIONS, "no sample in the middle of the search"
    for key, who in (("worker_rss", "the worker"), ("ui_rss", "the UI")):
        later = max(s[key] for s in samples if s["iteration"] >= base["iteration"])
        growth = later - base[key]
        assert growth < allowed_growth(base[key]), (
            f"{who}'s memory grew by {growth / MIB:.1f} MiB from iteration {base['iteration']} to "
            f"{ITERATIONS} (allowed {allowed_growth(base[key]) / MIB:.1f} MiB)\n{_table(samples)}")
    for s in samples:
        assert s["frontier"] <= FRONTIER_MAX_POINTS and s["history"] <= HISTORY_MAX_POINTS
        assert s["bus_backlog"] <= SUBSCRIPTION_LIMIT + 1
        assert s["subscriptions"] <= 4  # no subscription leaks per event or per redraw

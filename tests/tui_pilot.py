"""Helpers for the UI's pilot tests: wait for a condition, and the app on the protocol-speaking fake worker."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import sys
import time
from pathlib import Path

from epo_tui import protocol
from epo_tui.client import WorkerError
from epo_tui.config import Config, FeatureConfig, load_config
from epo_tui.engine.worker import EventWriter, answer_session_query
from epo_tui.tui.app import EpoApp, LoadSpec

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


async def until(pilot, condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def fake_app(ending: str | None = None, record: Path | None = None, config: Config | None = None) -> EpoApp:
    """The app on `tests/fake_worker.py ui [ending]` (40 features, feature 24 chosen), recording the
    commands it sends to `record` when given."""
    command = [sys.executable, str(FAKE_WORKER), "ui"] + ([ending] if ending else [])
    if record is not None:
        command += ["--record", str(record)]
    config = config or dataclasses.replace(Config(), feature=FeatureConfig(index=24))
    return EpoApp(config, LoadSpec({"demo": True}), worker_command=command)


def tiny_app(tiny_dir: Path, worker_command: list[str] | None = None) -> EpoApp:
    """The app on the tiny model (a real worker, local or the given command), with a search long enough
    never to end during a test."""
    config = load_config(str(tiny_dir / "config.toml"))
    config = dataclasses.replace(config, search=dataclasses.replace(config.search, iterations=100_000))
    return EpoApp(config, LoadSpec.of(config, demo=False), worker_command=worker_command)


def iteration_shown(app: EpoApp) -> int:
    """The iteration the status bar shows (0 before the first)."""
    from epo_tui.tui.components.status import StatusBar

    return app.query_one(StatusBar).fields.get("iteration") or 0


async def search_until(pilot, iterations: int, timeout: float = 30.0) -> str:
    """Waits for the features, presses `s`, waits until the status bar shows `iterations`; the session id."""
    app = pilot.app
    await until(pilot, lambda: app.ready is not None and app.chosen is not None, "the features", timeout)
    await pilot.press("s")
    await until(pilot, lambda: iteration_shown(app) >= iterations, f"iteration {iterations}", timeout)
    return app.session.session


async def ready(pilot) -> None:
    await until(pilot, lambda: pilot.app.ready is not None and pilot.app.chosen is not None, "the features")


class InProcessSessions:
    """The sessions browser's source without a worker process: the worker's own answers to `sessions` and
    `session` for the sessions in `root`, written as protocol lines and parsed back, in a thread (as the
    worker reads them off the UI's loop). An `error` answer raises WorkerError, as the client does."""

    def __init__(self, root: Path | None = None):
        self.root = root

    async def sessions(self) -> protocol.SessionList:
        return await self._ask(protocol.SessionsCommand(id=1))

    async def session(self, session_id: str) -> protocol.SessionDetails:
        return await self._ask(protocol.SessionCommand(id=1, session=session_id))

    async def _ask(self, command):
        def answer() -> protocol.Event:
            line = io.BytesIO()
            answer_session_query(command, EventWriter(line), self.root)
            return protocol.parse_event(line.getvalue())

        event = await asyncio.to_thread(answer)
        if isinstance(event, protocol.Error):
            raise WorkerError(event.kind, event.message, event)
        return event


FAKE_DATASET_LATENT, FAKE_DATASET_MAX = 24, 2.2  # the fake worker's elites reach 2.0-2.6 at iteration 5


def write_fake_dataset() -> None:
    """Dataset statistics for the fake worker's SAE (40 latents) in the data folder, as an import leaves
    them: latent 24 with maximum 2.2, density 0.81% and two examples; latent 7 with a density only."""
    import numpy as np

    from epo_tui import dataset_stats
    from epo_tui.dataset_stats import Example

    max_F, density_F = np.full(40, np.nan), np.full(40, np.nan)
    max_F[FAKE_DATASET_LATENT], density_F[FAKE_DATASET_LATENT], density_F[7] = FAKE_DATASET_MAX, 0.0081, 0.2
    examples = [Example.of([" The", " Debian", " project", " ships", " packages"], [0.0, 2.2, 0.4, 0.0, 0.1]),
                Example.of([" apt", " install", " on", " Ubuntu"], [0.3, 0.1, 0.0, 1.1])]
    dataset_stats.write_stats(dataset_stats.stats_folder(dataset_stats.sae_key("demo/model", "demo/sae")),
                              max_F, density_F, [(FAKE_DATASET_LATENT, examples)],
                              provenance={"origin": dataset_stats.NEURONPEDIA})

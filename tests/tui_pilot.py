"""Helpers for the UI's pilot tests: wait for a condition, and the app on the protocol-speaking fake worker."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from epo_tui.config import Config, FeatureConfig
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


async def ready(pilot) -> None:
    await until(pilot, lambda: pilot.app.ready is not None and pilot.app.chosen is not None, "the features")

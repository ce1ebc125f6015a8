"""A worker to drive from a test: `WorkerProcess`, the real `epo-tui worker` in a subprocess, and
`InProcessWorker`, its `Worker` class driven command by command in this process."""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from epo_tui import protocol
from epo_tui.engine.worker import EventWriter, Worker

TIMEOUT = 120


class WorkerProcess:
    """A worker subprocess; events parsed by a reader thread into a queue."""

    def __init__(self, cwd: Path, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "epo_tui", "worker"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # never let stderr fill

    def _read(self):
        for line in self.proc.stdout:
            protocol.parse_event(line)  # every stdout line must be a valid event (the dict is what tests read)
            self.events.put(json.loads(line))
        self.events.put(None)

    def send(self, type_: str, id=None, **fields) -> None:
        self.send_raw(protocol.encode(protocol.COMMANDS[type_](id=id, **fields)))

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def expect(self, type_: str, timeout: float = TIMEOUT, **match) -> dict:
        """The next event of this type (and fields), skipping others; fails on an unexpected error."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            assert event is not None, f"the worker exited waiting for {type_}; seen: {self.seen[-5:]}"
            self.seen.append(event)
            if event["type"] == "error" and type_ != "error":
                raise AssertionError(f"unexpected error while waiting for {type_}: {event}")
            if event["type"] == type_ and all(event.get(k) == v for k, v in match.items()):
                return event

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def load_and_start(w: WorkerProcess, tiny_dir: Path, iterations: int, **start_fields) -> dict:
    """Load the tiny config in `w` and start a search of `iterations` (checkpointing at every one); the `started` event."""
    w.send("load", id="l", config_path=str(tiny_dir / "config.toml"))
    ready = w.expect("ready", id="l")
    assert ready["hook"] == "blocks.1.hook_resid_pre" and ready["d_sae"] > 0 and ready["devices"]
    w.send("start", id="s", search={"iterations": iterations}, checkpoint_seconds=0, **start_fields)
    return w.expect("started", id="s")


class InProcessWorker:
    """epo_tui.engine.worker.Worker driven command by command in this process (the tiny pair loaded
    once): what its serve loop does, without the threads, so a fault lands exactly where a test puts it."""

    def __init__(self, pair, config, root: Path):
        self.stream = io.BytesIO()
        self.worker = Worker(EventWriter(self.stream), queue.Queue(), sessions_root=root)
        self.worker.pair, self.worker.config = pair, config
        self.read = 0

    def send(self, type_: str, id=None, **fields) -> list[dict]:
        cmd = protocol.parse_command(protocol.encode(protocol.COMMANDS[type_](id=id, **fields)))
        self.worker.guarded(cmd.id, self.worker.dispatch, cmd)
        return self.events()

    def iterate(self, n: int = 1) -> list[dict]:
        for _ in range(n):
            assert self.worker.active is not None and not self.worker.paused
            self.worker.guarded(None, self.worker.iterate)
        return self.events()

    def events(self) -> list[dict]:
        data = self.stream.getvalue()[self.read:]
        self.read += len(data)
        lines = data.splitlines()
        for line in lines:
            protocol.parse_event(line)  # each a valid event; tests read the JSON objects
        return [json.loads(line) for line in lines]

"""`epo-tui worker` on the tiny model: the protocol round trip, pause/score/resume/stop, garbage on
stdin, and sessions that survive SIGKILL and a client's SIGHUP, resumed exactly."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epo_tui import protocol, sessions
from worker_process import TIMEOUT, WorkerProcess, load_and_start

def test_round_trip_pause_score_resume_stop(worker_factory, tiny_dir):
    w = worker_factory()
    w.send("hello", id=1, client="test")
    assert w.expect("hello", id=1)["protocol"] == protocol.VERSION
    started = load_and_start(w, tiny_dir, 400, feature={"index": 3})
    session = started["session"]
    assert started["iterations_total"] == 400 and len(started["elites"]) == len(started["lambdas"])
    assert started["penalty_scale"].startswith("λ = 1 prices a nat at ")  # no dataset statistics: measured
    assert "3 standard deviations of the feature over the model's own text" in started["penalty_scale"]
    first = w.expect("progress")
    assert first["session"] == session and first["elites"][0]["tokens"][0] == "<|endoftext|>"
    w.send("pause", id="p")
    w.expect("checkpointed")
    w.expect("state", state="paused", id="p")
    w.send("score", id="sc", text="hello world")
    scored = w.expect("scored", id="sc")
    assert scored["feature"] == 3 and len(scored["activations"]) == len(scored["tokens"])
    assert scored["top_features"] == []  # not asked for
    w.send("score", id="top", text="hello world", top_features=2)
    top = w.expect("scored", id="top")["top_features"]
    assert len(top) <= 2 and all(t["act"] > 0 and t["position"] >= scored["prompt_start"] for t in top)
    time.sleep(0.5)
    assert all(e["type"] != "progress" for e in _drain(w)), "progress while paused"
    w.send("resume", id="r")
    w.expect("state", state="running")
    later = w.expect("progress")
    w.send("stop", id="x")
    finished = w.expect("finished", id="x")
    assert finished["status"] == "stopped" and finished["iteration"] >= later["iteration"]
    folder = Path(finished["folder"])
    result = json.loads((folder / "result.json").read_text())
    assert result["feature"]["indices"] == [3]
    meta = json.loads((folder / "session.json").read_text())
    assert meta["status"] == "stopped" and meta["checkpoint_iteration"] == finished["iteration"]
    w.send("shutdown", id="bye")
    w.expect("bye", id="bye")
    assert w.proc.wait(timeout=30) == 0


def _drain(w: WorkerProcess) -> list[dict]:
    out = []
    while True:
        try:
            event = w.events.get_nowait()
        except queue.Empty:
            return out
        if event is not None:
            w.seen.append(event)
            out.append(event)


def test_garbage_on_stdin_gets_errors_and_the_worker_keeps_serving(worker_factory):
    w = worker_factory()
    bad_lines = [
        b"\x00\xff\xfe garbage\n",
        b'{"v": 1, "type": "load", "demo": tru\n',  # truncated JSON
        b"[1, 2, 3]\n",
        b'{"v": 2, "type": "hello", "id": 7}\n',
        b'{"v": 1, "type": "rm -rf /", "id": 8}\n',
        b'{"v": 1, "type": "score", "id": 9}\n',  # missing text
        b'{"v": 1, "type": "score", "id": 10, "text": 5}\n',
        b'{"v": 1, "type": "hello", "id": 11, "exec": "import os"}\n',
        b"x" * (protocol.MAX_LINE_BYTES + 100) + b"\n",
        protocol.encode(protocol.ScoreCommand(id=12, text="no model yet")),
    ]
    for line in bad_lines:
        w.send_raw(line)
    errors = [w.expect("error") for _ in bad_lines]
    kinds = [e["kind"] for e in errors]
    assert kinds == ["protocol"] * 9 + ["input"], errors
    assert errors[3]["id"] == 7 and "version 2" in errors[3]["message"]
    assert errors[4]["id"] == 8 and "unknown command" in errors[4]["message"]
    assert "longer than" in errors[8]["message"]
    assert "no model loaded" in errors[9]["message"] and errors[9]["id"] == 12
    w.send("hello", id="still")
    assert w.expect("hello", id="still")["pid"] == w.proc.pid


def test_sigkill_then_resume_loses_only_the_iterations_since_the_last_checkpoint(worker_factory, tiny_dir):
    reference = worker_factory()
    load_and_start(reference, tiny_dir, 40, feature={"index": 3})
    straight = reference.expect("finished")
    straight_elites = sessions.Session(Path(straight["folder"])).read_elites()

    w = worker_factory()  # the same search, but far from done when it is killed
    session = load_and_start(w, tiny_dir, 100_000, feature={"index": 3})["session"]
    last = None
    while last is None or last["iteration"] < 8:
        last = w.expect("checkpointed")
    os.kill(w.proc.pid, signal.SIGKILL)
    w.proc.wait(timeout=30)
    found = sessions.find_session(session)
    assert found.read_meta()["checkpoint_iteration"] >= last["iteration"]
    assert found.read_meta()["status"] == "running" and not found.is_running_elsewhere()  # interrupted

    again = worker_factory()
    again.send("load", id="l", config_path=str(tiny_dir / "config.toml"))
    again.expect("ready")
    again.send("start", id="s", resume=session[-6:], search={"iterations": 40}, checkpoint_seconds=0)
    resumed = again.expect("started", id="s")
    assert resumed["session"] == session and resumed["iteration"] >= last["iteration"]
    done = again.expect("finished")
    assert done["status"] == "finished" and done["iteration"] == 40
    elites = sessions.Session(Path(done["folder"])).read_elites()
    # an exact resume: the same prompts as the run that was never interrupted
    assert [e.token_ids for e in elites] == [e.token_ids for e in straight_elites]


CLIENT = """
import subprocess, sys, time
from epo_tui import protocol
w = subprocess.Popen([sys.executable, "-m", "epo_tui", "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     start_new_session=True)
w.stdin.write(protocol.encode(protocol.LoadCommand(config_path=sys.argv[1])))
w.stdin.write(protocol.encode(protocol.StartCommand(search={"iterations": 100000}, checkpoint_seconds=0)))
w.stdin.flush()
for line in w.stdout:
    if b'"checkpointed"' in line and b'"iteration":5' in line:
        print(w.pid, flush=True)
    if b'"iteration":6' in line:
        break
time.sleep(600)
"""


def test_sighup_to_the_client_leaves_a_resumable_session(tmp_path, tiny_dir):
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(tiny_dir / "config.toml")], cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    worker_pid = int(client.stdout.readline())
    client.send_signal(signal.SIGHUP)  # the SSH link dropped: the client dies, the worker's stdin closes
    client.wait(timeout=30)  # SIGHUP's default action ends it at once
    # the worker notices its closed stdin between iterations, then checkpoints and exits; on 2 cores shared
    # with another search one iteration of the tiny model has taken seconds, so the bound is generous
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the worker outlived its client")
    found, problems = sessions.list_sessions()
    newest = found[0]
    assert not problems and newest.status == "stopped" and newest.checkpoint_iteration >= 5


def test_bad_config_inject_and_features(worker_factory, tiny_dir):
    w = worker_factory()
    w.send("load", id="bad", config={"search": {"elites": 0}})
    error = w.expect("error", id="bad")
    assert error["kind"] == "config" and "search.elites" in error["message"]
    w.send("load", id="l", config_path=str(tiny_dir / "config.toml"))
    ready = w.expect("ready", id="l")
    w.send("features", id="f")
    features = w.expect("features", id="f")["features"]
    assert len(features) == ready["d_sae"] and features[0]["index"] == 0 and features[0]["top_tokens"]
    w.send("start", id="s", search={"iterations": 100000}, feature={"index": 99999})
    assert "out of range" in w.expect("error", id="s")["message"]
    w.send("start", id="s2", search={"iterations": 100000})
    w.expect("started", id="s2")
    # paused, no iteration can replace the injected prompt (a child may beat it at its λ) before the stop
    w.send("pause", id="p")
    w.expect("state", state="paused", id="p")
    w.send("inject", id="i", text="hello")
    injected = w.expect("injected", id="i")
    assert injected["text"].startswith("hello") and 0 <= injected["elite"] < 4
    w.send("shutdown", id="q")
    finished = w.expect("finished")
    assert w.expect("bye", id="q")["id"] == "q"
    saved = sessions.Session(Path(finished["folder"])).read_elites()
    assert saved[injected["elite"]].text == injected["text"]  # the stop kept the injected elite


def test_library_warnings_become_log_events():
    import io
    import logging

    from epo_tui.engine.worker import LogEvents, EventWriter

    stream = io.BytesIO()
    handler = LogEvents(EventWriter(stream))
    logger = logging.getLogger("some.library")
    logger.addHandler(handler)
    try:
        logger.warning("disk %s is slow\nsecond line", "sda")
        logger.info("not sent")
    finally:
        logger.removeHandler(handler)
    events = [protocol.parse_event(line) for line in stream.getvalue().splitlines()]
    assert events == [protocol.Log(level="warning", message="some.library: disk sda is slow")]


def test_client_restarts_a_killed_worker_and_resumes_its_session(tiny_dir, tmp_path, monkeypatch):
    """The UI's path: the client sees the worker die (with its stderr), restarts it, resumes."""
    import asyncio

    from epo_tui.client import WorkerClient

    monkeypatch.chdir(tmp_path)

    async def scenario():
        async with WorkerClient() as client:
            events = client.bus.subscribe({protocol.Checkpointed, protocol.Error, protocol.Started})
            await client.request(protocol.LoadCommand(config_path=str(tiny_dir / "config.toml")), timeout=TIMEOUT)
            started = await client.request(protocol.StartCommand(search={"iterations": 100000}, checkpoint_seconds=0),
                                           timeout=TIMEOUT)
            checkpointed = None
            while checkpointed is None or checkpointed.iteration < 5:
                event = await asyncio.wait_for(events.get(), TIMEOUT)
                checkpointed = event if isinstance(event, protocol.Checkpointed) else checkpointed
            os.kill(client.pid, signal.SIGKILL)
            while True:
                event = await asyncio.wait_for(events.get(), TIMEOUT)
                if isinstance(event, protocol.Error):
                    break
            assert event.kind == "worker_died" and "SIGKILL" in event.message
            resumed = await client.restart(resume=True, timeout=TIMEOUT)
            assert isinstance(resumed, protocol.Started) and resumed.session == started.session
            assert resumed.iteration >= checkpointed.iteration
            await client.request(protocol.StopCommand(), timeout=TIMEOUT)

    asyncio.run(scenario())


def test_a_session_runs_in_one_worker_at_a_time(worker_factory, tiny_dir):
    w = worker_factory()
    session = load_and_start(w, tiny_dir, 100_000)["session"]
    w.send("pause", id="p")
    w.expect("state", state="paused", id="p")
    assert sessions.find_session(session).is_running_elsewhere()  # paused still belongs to its worker
    rival = worker_factory()
    rival.send("load", id="l", config_path=str(tiny_dir / "config.toml"))
    rival.expect("ready")
    rival.send("start", id="s", resume=session, checkpoint_seconds=0)
    assert "another process is running this session" in rival.expect("error", id="s")["message"]
    w.send("stop", id="x")
    w.expect("finished", id="x")
    assert not sessions.find_session(session).is_running_elsewhere()
    rival.send("start", id="s2", resume=session, search={"iterations": 3})  # now it may
    assert rival.expect("finished")["status"] == "finished"


def test_sessions_are_listed_read_and_resumed_over_the_protocol(worker_factory, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a sessions folder of this test's own
    w = worker_factory()
    w.send("load", id="l", config_path=str(tiny_dir / "config.toml"))
    w.send("sessions", id="early")  # answered at once, while the model loads
    assert w.expect("session_list", id="early")["sessions"] == []
    assert "ready" not in [e["type"] for e in w.seen]
    w.expect("ready", id="l")
    w.send("start", id="s", search={"iterations": 3}, checkpoint_seconds=0)
    session = w.expect("started", id="s")["session"]
    w.expect("finished")

    w.send("sessions", id="list")
    listing = w.expect("session_list", id="list")
    [info] = listing["sessions"]
    assert listing["host"] == socket.gethostname() and listing["problems"] == []
    assert (info["id"], info["status"], info["checkpoint_iteration"], info["iterations_total"], info["hook"]) == (
        session, "finished", 3, 3, "blocks.1.hook_resid_pre")
    w.send("session", id="one", session=session[-6:])
    details = w.expect("session_details", id="one")
    saved = sessions.find_session(session)
    assert details["meta"] == saved.read_meta() and details["running_elsewhere"] is False
    assert [protocol.Elite.from_json(e) for e in details["elites"]] == saved.read_elites()
    assert details["history"] and details["history"][0]["iteration"] == 0
    w.send("session", id="none", session="nope")
    assert w.expect("error", id="none")["kind"] == "input"
    w.send("resume", id="bad", iterations=9)
    assert "iterations goes with session" in w.expect("error", id="bad")["message"]

    w.send("resume", id="more", session=session, iterations=100_000)
    resumed = w.expect("started", id="more")
    assert (resumed["session"], resumed["iteration"], resumed["iterations_total"]) == (session, 3, 100_000)
    w.expect("progress")
    w.send("session", id="busy", session=session)
    assert w.expect("session_details", id="busy")["session"]["status"] == "running"
    w.send("resume", id="twice", session=session)
    assert "a search is running" in w.expect("error", id="twice")["message"]
    w.send("stop", id="x")
    assert w.expect("finished", id="x")["status"] == "stopped"


def test_a_session_resumes_only_on_its_own_model_and_sae(worker_factory, tiny_dir, tmp_path):
    w = worker_factory()
    session = load_and_start(w, tiny_dir, 2)["session"]
    assert w.expect("finished")["status"] == "finished"
    other = tmp_path / "bf16.toml"  # the same files, run in another dtype: another model as far as results go
    other.write_text((tiny_dir / "config.toml").read_text().replace('path = "model"',
                     f'path = "{tiny_dir / "model"}"\ndtype = "bfloat16"').replace('path = "sae"',
                     f'path = "{tiny_dir / "sae"}"'))
    stranger = worker_factory()
    stranger.send("load", id="l", config_path=str(other))
    stranger.expect("ready", id="l")
    stranger.send("start", id="s", resume=session, search={"iterations": 4})
    error = stranger.expect("error", id="s")
    assert error["kind"] == "input" and "ran on another model or SAE" in error["message"]
    assert sessions.find_session(session).read_meta()["status"] == "finished"  # untouched


def _labelled_config(tiny_dir: Path, folder: Path, labels_layer: int, index: int) -> tuple[Path, Path]:
    """(config, labels export): the tiny model with a 64-latent SAE at blocks.1 (Neuronpedia id
    tiny/1-res-test) and labels "l<layer> <i>" exported for layer `labels_layer`, feature `index` chosen."""
    from epo_tui.engine.sae_writer import write_random_sae
    from epo_tui.labels import write_explanations

    sae = write_random_sae(folder / "sae", d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_pre",
                           neuronpedia_id="tiny/1-res-test", input_norm=0.65)
    export = folder / f"layer{labels_layer}.jsonl"
    write_explanations(export, [{"modelId": "tiny", "layer": f"{labels_layer}-res-test", "index": str(i),
                                 "description": f"l{labels_layer} {i}"} for i in range(64)])
    config = folder / "c.toml"
    config.write_text(f'[model]\npath = "{tiny_dir / "model"}"\n[sae]\npath = "{sae}"\nlabels = "{export}"\n'
                      f'[feature]\nindex = {index}\n')
    return config, export


def test_labels_for_another_layer_are_one_warning_and_the_catalog_still_comes(worker_factory, tiny_dir, tmp_path):
    """The config's sae.labels is checked against the loaded SAE's Neuronpedia id, which `ready` carries."""
    config, export = _labelled_config(tiny_dir, tmp_path, labels_layer=0, index=0)
    w = worker_factory()
    w.send("load", id="l", config_path=str(config))
    ready = w.expect("ready", id="l")
    assert ready["neuronpedia_id"] == "tiny/1-res-test" and ready["d_sae"] == 64
    log = w.expect("log")
    assert log["level"] == "warning" and log["message"] == (
        f"sae.labels not applied: {export}: an export for tiny/0-res-test, not for this SAE (tiny/1-res-test): "
        "not imported")
    w.send("features", id="f")
    features = w.expect("features", id="f")["features"]
    assert len(features) == 64 and all(f["label"] is None for f in features)
    w.send("start", id="s", search={"iterations": 1})
    assert w.expect("started", id="s")["label"] == "feature 0"  # not "l0 0"


def test_started_carries_the_features_label_as_the_session_keeps_it(worker_factory, tiny_dir, tmp_path):
    """`label` is the status text; `feature_label` the interpretation from the worker's labels, the same
    when the session is resumed (favorites head their entries with it)."""
    config, _ = _labelled_config(tiny_dir, tmp_path, labels_layer=1, index=5)
    w = worker_factory()
    w.send("load", id="l", config_path=str(config))
    w.expect("ready", id="l")
    w.send("start", id="s", search={"iterations": 2}, checkpoint_seconds=0)
    started = w.expect("started", id="s")
    assert (started["label"], started["feature_label"]) == ("feature 5", "l1 5")
    w.expect("finished")
    assert sessions.find_session(started["session"]).read_meta()["label"] == "l1 5"
    w.send("start", id="r", resume=started["session"], search={"iterations": 3})
    resumed = w.expect("started", id="r")
    assert (resumed["session"], resumed["feature_label"]) == (started["session"], "l1 5")

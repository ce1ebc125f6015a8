"""Issue 7 §2, faults: a worker SIGKILLed again and again, a full disk under each file a session, the
favorites or the stars write, two UIs on one cache, a session folder deleted under a running search.

The client's terminal closing (SIGHUP) mid-search is tests/engine/test_worker.py::
test_sighup_to_the_client_leaves_a_resumable_session; a session resumed by a second worker while the
first runs it is tests/engine/test_worker.py::test_a_session_runs_in_one_worker_at_a_time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli_run import run_cli
from epo_tui import protocol, sessions
from worker_process import TIMEOUT, InProcessWorker, WorkerProcess, load_and_start

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


# ----------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def inproc(tiny_pair, tiny_config, tmp_path):
    return InProcessWorker(tiny_pair, tiny_config, tmp_path / "sessions")


def _of(events: list[dict], type_: str) -> list[dict]:
    return [e for e in events if e["type"] == type_]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _full_disk(monkeypatch, name: str, failures: list | None = None) -> None:
    """The disk is full for writes to `name` (a temp file `.<name>.XXX.tmp` of an atomic write, or the file
    itself for an append): their fsync raises ENOSPC, as a filesystem reports space it could not allocate."""
    real = os.fsync

    def fsync(fd):
        if name in Path(os.readlink(f"/proc/self/fd/{fd}")).name:
            if failures is not None:
                failures.append(name)
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


# ----------------------------------------------------------------------------------------------
# 1. The worker killed (SIGKILL) 20 times across one search


KILLS = 20


def _start_fields(checkpoint_seconds: float, **fields) -> dict:
    return {"checkpoint_seconds": checkpoint_seconds, **fields}


def _drain_to_exit(w) -> list[dict]:
    """Every event the killed worker wrote before it died (the pipe keeps them)."""
    out = []
    while True:
        event = w.events.get(timeout=30)
        if event is None:
            return out
        w.seen.append(event)
        out.append(event)


@pytest.mark.slow
def test_twenty_sigkills_across_one_search_each_resume_at_the_last_checkpoint_and_end_exact(
        worker_factory, tiny_dir):
    rng = random.Random(7)
    config = str(tiny_dir / "config.toml")
    w = worker_factory()
    w.send("load", id="l", config_path=config)
    w.expect("ready", id="l")
    w.send("start", id="s", feature={"index": 3}, search={"iterations": 100_000}, checkpoint_seconds=0.5)
    session_id = w.expect("started", id="s")["session"]
    w.expect("progress")
    session = sessions.find_session(session_id)
    resumed_at, mid_checkpoint, mid_iteration = [0], 0, 0
    for kill in range(KILLS):
        time.sleep(rng.uniform(0, 1.2))  # a seeded-random moment of the running search
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait(timeout=30)
        events = w.seen + _drain_to_exit(w)
        checkpointed = [e["iteration"] for e in events if e["type"] == "checkpointed"]
        last_event = max(checkpointed, default=resumed_at[-1])
        meta = session.read_meta()
        on_disk = int(session.read_checkpoint()[1]["iteration"])
        assert meta["status"] == "running" and not session.is_running_elsewhere()  # shown as interrupted
        assert on_disk >= last_event and on_disk >= meta["checkpoint_iteration"] >= resumed_at[-1]
        if on_disk > last_event or meta["checkpoint_iteration"] < on_disk:
            mid_checkpoint += 1  # killed after the checkpoint file was replaced, before its event / session.json
        else:
            mid_iteration += 1

        w = worker_factory()
        w.send("load", id="l", config_path=config)
        w.expect("ready", id="l")
        last = kill == KILLS - 1
        # the last resume sets the total: a little beyond where it is, so the test ends soon
        search = {"iterations": on_disk + 25} if last else {}
        w.send("start", id="s", resume=session_id, search=search, checkpoint_seconds=0.5)
        started = w.expect("started", id="s")
        assert started["session"] == session_id
        assert started["iteration"] == on_disk  # at most the iterations since the last checkpoint are lost
        resumed_at.append(started["iteration"])
        if not last:
            w.expect("progress")  # compiled (from the cache) and running
    total = resumed_at[-1] + 25
    done = w.expect("finished")
    assert done["status"] == "finished" and done["iteration"] == total
    elites = session.read_elites()

    reference = worker_factory()  # the same search (same seed, same total), never interrupted
    load_and_start(reference, tiny_dir, total, feature={"index": 3})
    straight = reference.expect("finished")
    assert [e.token_ids for e in elites] == \
        [e.token_ids for e in sessions.Session(Path(straight["folder"])).read_elites()]
    history, problems = session.read_history()
    assert not problems and history
    print(f"\n{KILLS} kills: {mid_iteration} between checkpoints (iterating, compiling or loading), "
          f"{mid_checkpoint} mid-checkpoint; resumed at {resumed_at[1:]}; total {total}")
    assert resumed_at[-1] > 0


# ----------------------------------------------------------------------------------------------
# 2. The disk full while a checkpoint or a session file is written (the worker, in-process)


def _running(inproc: InProcessWorker, iterations: int = 100_000) -> sessions.Session:
    started = _of(inproc.send("start", id="s", feature={"index": 3}, search={"iterations": iterations},
                              checkpoint_seconds=0), "started")
    assert started, inproc.events()
    inproc.iterate(2)
    return sessions.Session(inproc.worker.active.session.folder)


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "elites.json", "history.jsonl", "session.json"])
def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_says_so_and_retries(inproc, monkeypatch, name):
    session = _running(inproc)
    before = _files(session.folder)
    checkpoint_before = session.read_meta()["checkpoint_iteration"]
    failures: list[str] = []
    _full_disk(monkeypatch, name, failures)
    active = inproc.worker.active  # a point of its own to append, so every try writes history.jsonl too
    active.pending_history.append(dataclasses.replace(active._points(active.state.frontier, [0])[0],
                                                      iteration=999_999))
    events = inproc.iterate(3)
    errors = _of(events, "error")
    assert failures and len(errors) == 3 and len(_of(events, "progress")) == 3  # one error per failed try
    for error in errors:
        assert error["kind"] == "session" and name in error["message"] and NO_SPACE in error["message"]
        assert "\n" not in error["message"] and "tries again" in error["message"]
    if name == "checkpoint.safetensors":  # written first: nothing after it was written
        assert _files(session.folder) == before
    else:  # the files before it are newer and whole (the checkpoint's own metadata says which
        # iteration it holds; session.json never claims more); the file that failed is byte-identical
        assert _files(session.folder)[name] == before[name]
        assert session.read_checkpoint()[1]["iteration"] == str(inproc.worker.active.state.iteration)
    assert session.read_meta()["checkpoint_iteration"] in (checkpoint_before, inproc.worker.active.state.iteration)

    paused = inproc.send("pause", id="p")  # pausing checkpoints too: the same error, and it pauses
    assert [e["kind"] for e in _of(paused, "error")] == ["session"]
    assert _of(paused, "state")[-1]["state"] == "paused"
    monkeypatch.undo()  # space freed
    inproc.send("resume", id="r")
    events = inproc.iterate(1)
    assert not _of(events, "error") and _of(events, "checkpointed")
    finished = _of(inproc.send("stop", id="x"), "finished")
    assert finished and finished[0]["status"] == "stopped"
    history, problems = session.read_history()
    assert not problems
    keys = [(p["iteration"], tuple(p["token_ids"])) for p in history]
    assert len(keys) == len(set(keys))  # a retried append did not write its points twice
    assert sum(p["iteration"] == 999_999 for p in history) == 1
    assert session.read_meta()["checkpoint_iteration"] == finished[0]["iteration"]


def test_a_full_disk_at_stop_is_one_error_and_the_session_stays_resumable(inproc, monkeypatch):
    session = _running(inproc)
    inproc.send("stop", id="x1")
    result_before = (session.folder / "result.json").read_bytes()
    started = _of(inproc.send("start", id="s2", resume=session.id, search={"iterations": 50},
                              checkpoint_seconds=0), "started")
    assert started and started[0]["iteration"] == 2
    inproc.iterate(2)
    before = _files(session.folder)
    _full_disk(monkeypatch, "result.json")
    events = inproc.send("stop", id="x2")
    error, = _of(events, "error")
    assert error["id"] == "x2" and error["kind"] == "session" and "result.json" in error["message"]
    assert NO_SPACE in error["message"] and "the search stopped at iteration 4" in error["message"]
    assert _of(events, "state")[-1]["state"] == "idle" and inproc.worker.active is None
    assert (session.folder / "result.json").read_bytes() == result_before  # the earlier result, intact
    assert session.read_meta()["checkpoint_iteration"] == 4 and before  # the last checkpoint was saved
    monkeypatch.undo()
    assert not session.is_running_elsewhere()
    again = _of(inproc.send("start", id="s3", resume=session.id, search={"iterations": 5}), "started")
    assert again and again[0]["iteration"] == 4
    assert _of(inproc.iterate(1), "finished")[0]["status"] == "finished"


def test_a_full_disk_stops_epo_tui_run_with_one_line_and_exit_2(tiny_dir, tmp_path, monkeypatch):
    _full_disk(monkeypatch, "checkpoint.safetensors")
    code, out, err = run_cli("run", "--config", tiny_dir / "config.toml", "--iterations", "3",
                             "--out", tmp_path / "out")
    assert code == 2 and out == "" and "Traceback" not in err
    line = _the_error_line(err)
    assert "checkpoint.safetensors" in line and NO_SPACE in line, err


def _the_error_line(err: str) -> str:
    """The one error line of a CLI run (the progress lines before it are stderr too)."""
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.mark.slow
def test_a_really_full_disk_under_a_running_worker(tmp_path, tiny_dir):
    """A real full filesystem (a 1 MiB tmpfs holding the sessions), when this runs as root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    cache = tmp_path / "cache"
    mount = cache / "epo-tui" / "sessions"
    mount.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    from epo_tui.engine.compile_cache import compile_cache_dir

    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "EPO_TUI_JAX_CACHE": str(compile_cache_dir())}
    w = None
    try:
        w = WorkerProcess(tmp_path, env)
        w.expect("hello")
        session_id = load_and_start(w, tiny_dir, 100_000, feature={"index": 3})["session"]
        w.expect("checkpointed")
        folder = mount / session_id
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the disk to the last block
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
        error = w.expect("error", timeout=60)
        assert error["kind"] == "session" and "no space left" in error["message"].lower(), error
        before = _files(folder)
        w.expect("error", timeout=60)  # a second failed try: nothing changed on disk
        assert _files(folder) == before
        session = sessions.Session(folder)
        assert int(session.read_checkpoint()[1]["iteration"]) >= session.read_meta()["checkpoint_iteration"]
        w.send("score", id="sc", text="hello")  # the worker still serves
        _expect_skipping_errors(w, "scored", id="sc")
        filler.unlink()  # space freed: the next checkpoint lands
        _expect_skipping_errors(w, "checkpointed")
        w.send("stop", id="x")
        assert _expect_skipping_errors(w, "finished", id="x")["status"] == "stopped"
    finally:
        if w is not None:
            w.close()
        subprocess.run(["umount", "-l", str(mount)])


def _expect_skipping_errors(w, type_: str, **match) -> dict:
    """The next event of this type, past the `session` errors of checkpoints that failed meanwhile."""
    while True:
        event = w.events.get(timeout=TIMEOUT)
        assert event is not None, f"the worker exited waiting for {type_}"
        w.seen.append(event)
        if event["type"] == "error":
            assert event["kind"] == "session", event
            continue
        if event["type"] == type_ and all(event.get(k) == v for k, v in match.items()):
            return event


# ----------------------------------------------------------------------------------------------
# 2c. The disk full while a favorite or a star is saved


def test_a_full_disk_while_saving_a_favorite_from_the_cli_is_one_line_and_keeps_the_file(inproc, monkeypatch):
    from epo_tui.favorites import read_favorites

    session = _running(inproc)
    inproc.send("stop", id="x")
    from epo_tui import paths

    favorites = paths.data_dir() / "favorites.md"
    favorites.unlink(missing_ok=True)
    root = str(session.folder.parent)
    monkeypatch.setattr(sessions, "sessions_dir", lambda root_=None: Path(root))
    code, out, err = run_cli("sessions", "export", session.id, "--favorite", "1")
    assert code == 0, err
    before = favorites.read_bytes()
    _full_disk(monkeypatch, "favorites.md")
    code, out, err = run_cli("sessions", "export", session.id, "--favorite", "2")
    assert code == 2 and err.count("\n") == 1 and NO_SPACE in err and "favorites.md" in err, err
    assert favorites.read_bytes() == before and len(read_favorites(favorites)) == 1
    assert [p.name for p in favorites.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_full_disk_while_starring_keeps_the_stars_file(tmp_path, monkeypatch):
    from epo_tui.errors import UserError
    from epo_tui.stars import Stars

    stars = Stars.load("sae-key", tmp_path / "stars.json")
    stars.toggle_star(3)
    stars.set_note(3, "kept")
    before = (tmp_path / "stars.json").read_bytes()
    _full_disk(monkeypatch, "stars.json")
    with pytest.raises(UserError, match=f"could not save the star or note to .*stars.json: {NO_SPACE}"):
        stars.toggle_star(4)
    assert (tmp_path / "stars.json").read_bytes() == before
    assert stars.starred() == {3} and Stars.load("sae-key", tmp_path / "stars.json").note(3) == "kept"


# ----------------------------------------------------------------------------------------------
# 4. Two UIs on one cache and data folder at once


SAVER = textwrap.dedent("""
    import sys
    from epo_tui import sessions
    from epo_tui.favorites import append_favorite, favorite_from_elite, favorites_path
    from epo_tui.config import load_config
    from epo_tui.stars import Stars
    session_id, side, config_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    session = sessions.find_session(session_id)
    path = favorites_path(load_config(config_path))
    stars = Stars.load("tiny-sae")
    for i in range(20):
        meta, elites = session.read_meta(), session.read_elites()  # while the worker rewrites them
        append_favorite(path, favorite_from_elite(meta, elites[i % len(elites)]))
        stars.toggle_star(side * 100 + i)
        stars.set_note(side * 100 + i, f"side {side} note {i}")
    print(path)
""")


@pytest.mark.slow
def test_two_uis_search_and_save_favorites_and_stars_at_once(tiny_dir, tmp_path, monkeypatch):
    from epo_tui.client import WorkerClient, WorkerError
    from epo_tui.favorites import read_favorites
    from epo_tui.stars import Stars

    from epo_tui.config import load_config
    from epo_tui.favorites import favorites_path

    monkeypatch.chdir(tmp_path)
    config = str(tiny_dir / "config.toml")
    shared = favorites_path(load_config(config))  # the data folder is the test run's: earlier tests' entries stay
    saved_before = len(read_favorites(shared)) if shared.exists() else 0

    async def scenario():
        async with WorkerClient() as one, WorkerClient() as two:
            errors = [c.bus.subscribe({protocol.Error}) for c in (one, two)]
            await asyncio.gather(*(c.request(protocol.LoadCommand(config_path=config), timeout=TIMEOUT)
                                   for c in (one, two)))
            started = await asyncio.gather(*(
                client.request(protocol.StartCommand(feature={"index": index}, search={"iterations": 100_000},
                                                     checkpoint_seconds=0), timeout=TIMEOUT)
                for client, index in ((one, 3), (two, 5))))
            ids = [s.session for s in started]
            while not all(sessions.find_session(i).read_elites() for i in ids):
                await asyncio.sleep(0.1)
            savers = [await asyncio.create_subprocess_exec(sys.executable, "-c", SAVER, ids[side], str(side + 1),
                                                           config, stdout=asyncio.subprocess.PIPE,
                                                           stderr=asyncio.subprocess.PIPE)
                      for side in (0, 1)]
            outputs = await asyncio.gather(*(s.communicate() for s in savers))
            assert [s.returncode for s in savers] == [0, 0], outputs  # no lock error, no crash
            finished = [None, await two.request(protocol.StopCommand(), timeout=TIMEOUT)]
            with pytest.raises(WorkerError, match="another process is running this session"):
                # the second UI cannot take it
                await two.request(protocol.StartCommand(resume=ids[0]), timeout=TIMEOUT)
            finished[0] = await one.request(protocol.StopCommand(), timeout=TIMEOUT)
            for sub in errors:
                while sub.backlog:
                    event = await sub.get()
                    assert "another process" in event.message, event  # only the refused resume
            return ids, finished, Path(outputs[0][0].decode().strip())

    ids, finished, favorites_file = asyncio.run(scenario())
    assert [f.status for f in finished] == ["stopped", "stopped"]
    for session_id, feature, done in zip(ids, (3, 5), finished):  # each session whole and its own
        session = sessions.find_session(session_id)
        meta = session.read_meta()
        assert meta["feature"]["indices"] == [feature] and meta["status"] == "stopped"
        assert meta["checkpoint_iteration"] == done.iteration == int(session.read_checkpoint()[1]["iteration"])
        assert session.read_history()[1] == [] and json.loads((session.folder / "result.json").read_text())
    assert favorites_file == shared
    entries = read_favorites(favorites_file)
    assert len(entries) == saved_before + 40  # every favorite landed
    assert sum(f"from session `{ids[0]}`" in e for e in entries) == 20
    assert sum(f"from session `{ids[1]}`" in e for e in entries) == 20
    stars = Stars.load("tiny-sae")
    assert stars.starred() == {100 + i for i in range(20)} | {200 + i for i in range(20)}
    assert stars.note(215) == "side 2 note 15" and stars.note(107) == "side 1 note 7"


# ----------------------------------------------------------------------------------------------
# 5. A session folder deleted under a running search


def _delete(folder: Path) -> None:
    """As `epo-tui sessions delete --force ID` from another shell while the worker writes."""
    sessions.delete_session(folder.name, root=folder.parent, force=True)


def test_a_deleted_session_folder_stops_the_search_in_process(inproc):
    session = _running(inproc)
    _delete(session.folder)
    events = inproc.iterate(1)
    error, = _of(events, "error")
    assert error["kind"] == "session" and f"session {session.id}'s folder was deleted" in error["message"]
    assert "the search stopped at iteration 3" in error["message"] and error["traceback"] is None
    assert _of(events, "state")[-1]["state"] == "idle" and inproc.worker.active is None
    assert not session.folder.exists()  # nothing recreated it
    assert _of(inproc.send("score", id="sc", text="hello"), "scored")
    fresh = _running(inproc, iterations=3)
    assert _of(inproc.iterate(1), "finished")[0]["status"] == "finished" and fresh.read_meta()["status"] == "finished"


@pytest.mark.parametrize("command", ["pause", "stop"])
def test_a_deleted_session_folder_at_pause_or_stop(inproc, command):
    session = _running(inproc)
    _delete(session.folder)
    events = inproc.send(command, id="c")
    error, = _of(events, "error")
    assert error["kind"] == "session" and "folder was deleted" in error["message"] and error["id"] == "c"
    assert inproc.worker.active is None and _of(events, "state")[-1]["state"] == "idle"
    assert not session.folder.exists()


DELETES = 5


@pytest.mark.slow
def test_a_deleted_session_folder_under_a_running_worker(worker_factory, tiny_dir):
    """The real process, the folder deleted at a random moment while it checkpoints every iteration."""
    rng = random.Random(11)
    w = worker_factory()
    w.send("load", id="l", config_path=str(tiny_dir / "config.toml"))
    w.expect("ready", id="l")
    for n in range(DELETES):
        w.send("start", id=f"s{n}", feature={"index": 3}, search={"iterations": 100_000}, checkpoint_seconds=0)
        folder = sessions.find_session(w.expect("started", id=f"s{n}")["session"]).folder
        w.expect("progress")
        time.sleep(rng.uniform(0, 0.3))
        _delete(folder)
        error = w.expect("error", timeout=20)
        assert error["kind"] == "session" and "folder was deleted" in error["message"]
        assert "the search stopped" in error["message"] and error["traceback"] is None
        w.expect("state", state="idle")
        w.send("score", id=f"sc{n}", text="still here")
        w.expect("scored", id=f"sc{n}")
        assert not folder.exists()  # not recreated by a write that raced the deletion
    w.send("start", id="last", search={"iterations": 3})
    assert w.expect("finished")["status"] == "finished"
    assert w.proc.poll() is None


def test_a_deleted_session_folder_under_epo_tui_run(tiny_dir, tmp_path, monkeypatch):
    """`epo-tui run`: one line, exit 2, and the run's own results still in --out."""
    from epo_tui.engine.session_search import RecordedSearch

    real_step = RecordedSearch.step

    def step(self):
        changed = real_step(self)
        if self.state.iteration == 2:
            _delete(self.session.folder)
            self.checkpoint_seconds = 0  # the next iteration checkpoints and finds the folder gone
        return changed
    monkeypatch.setattr(RecordedSearch, "step", step)
    out = tmp_path / "out"
    code, stdout, err = run_cli("run", "--config", tiny_dir / "config.toml", "--iterations", "6", "--out", out)
    assert code == 2 and "Traceback" not in err, err
    line = _the_error_line(err)
    assert "folder was deleted" in line and "the search stopped at iteration 3" in line and str(out) in line
    result = json.loads((out / "result.json").read_text())
    assert result["timings"]["interrupted"] and (out / "report.md").exists()


def test_a_session_folder_deleted_just_before_run_finishes(tiny_dir, tmp_path, monkeypatch):
    from epo_tui.engine.session_search import RecordedSearch

    real_finish = RecordedSearch.finish

    def finish(self, *args, **kwargs):
        _delete(self.session.folder)
        return real_finish(self, *args, **kwargs)
    monkeypatch.setattr(RecordedSearch, "finish", finish)
    out = tmp_path / "out"
    code, stdout, err = run_cli("run", "--config", tiny_dir / "config.toml", "--iterations", "2", "--out", out)
    assert code == 2 and "Traceback" not in err and "folder was deleted" in _the_error_line(err), err
    assert json.loads((out / "result.json").read_text())["timings"]["iterations_run"] == 2

"""Sessions on disk: exact checkpoints, history that survives a crash mid-append, listings that skip
what is broken, and writes that never destroy what was there."""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from epo_tui import sessions
from epo_tui.errors import UserError
from epo_tui.protocol import Elite
from epo_tui.results import md_text
from epo_tui.session_report import export_markdown
from epo_tui.sessions import SessionError, create_session, delete_session, find_session, \
    list_sessions


def _meta(**extra) -> dict:
    return {"config": {"search": {"seed": 0}}, "model": "gpt2", "sae": {"name": "gpt2-small-res-jb",
            "hook": "blocks.8.hook_resid_pre"}, "feature": {"kind": "sae", "indices": [234], "combine": "lp",
            "lp_p": 0.1, "lp_offset": 4.0, "read": "last", "hook": ""}, "lambdas": [1.0, 20.0],
            "iterations_total": 750, **extra}


def _elite(tokens: list[str], act: float = 2.5) -> dict:
    return {"penalty": 1.0, "token_ids": list(range(len(tokens))), "tokens": tokens,
            "activations": [0.0] + [act] * (len(tokens) - 1), "act": act, "xent": 3.0, "objective": act - 3.0,
            "prompt_start": 1, "text": "".join(tokens[1:])}


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    objective = rng.standard_normal(8).astype(np.float32)
    objective[:3] = [np.nan, -np.inf, -0.0]
    return {"tokens_KxN": rng.integers(0, 50257, (8, 20)).astype(np.int32),
            "objective_K": objective,
            "key": np.array([0xDEADBEEF, 7], np.uint32),
            "frontier_tokens": np.zeros((0, 20), np.int32),
            "best_objective_history": rng.standard_normal(100).astype(np.float32),
            "iteration": np.array(42, np.int64)}


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def with_ids(monkeypatch):
    """Sessions created next get these ids, in order."""
    def use(*ids):
        monkeypatch.setattr(sessions, "new_session_id", iter(ids).__next__)
    return use


def test_ids_sort_by_time_and_default_root_is_in_the_cache():
    first = sessions.new_session_id()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", first)
    second = datetime(2026, 12, 1, 6, 10, 4, 2, tzinfo=timezone.utc)
    ids = [sessions.new_session_id(second.replace(microsecond=m)) for m in (999_999, 2, 65_536, 10)]
    assert [i[:21] for i in sorted(ids)] == ["20261201-061004-00002", "20261201-061004-0000a",
                                            "20261201-061004-10000", "20261201-061004-f423f"]
    assert sessions.sessions_dir() == sessions.paths.cache_dir() / "sessions"


def test_an_elite_that_is_not_one_is_a_session_error_naming_the_file_and_field(root):
    session = create_session(_meta(), root)
    elite = _elite(["<bos>", " a"])
    session.write_checkpoint(_arrays(), 1, [elite, {**elite, "act": "high"}])
    with pytest.raises(SessionError, match=r"elites\.json: an elite is malformed \(field '1?\.?act': input should "
                                           r"be a valid number\)"):
        session.read_elites()


def test_checkpoint_round_trip_is_bit_exact(root):
    session = create_session(_meta(), root)
    meta = session.read_meta()
    assert (meta["status"], meta["iteration"], meta["checkpoint_iteration"], meta["version"]) == ("running", 0, None, 1)
    assert meta["id"] == session.id and meta["created"] == meta["updated"]
    arrays, elites = _arrays(), [_elite(["<bos>", " a", " b"])]
    session.write_checkpoint(arrays, 42, elites)

    loaded, metadata = session.read_checkpoint()
    assert loaded.keys() == arrays.keys()
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
        assert loaded[name].tobytes() == array.tobytes(), name  # NaN, -0.0 and inf included
    assert metadata["format"] == "1" and metadata["iteration"] == "42" and metadata["session"] == session.id
    assert "saved" in metadata
    assert session.read_elites() == [Elite.from_json(e) for e in elites]
    assert session.read_meta()["checkpoint_iteration"] == 42


def test_update_meta_keeps_unknown_keys_and_refuses_fixed_ones(root):
    session = create_session(_meta(), root)
    path = session.folder / "session.json"
    written = json.loads(path.read_text())
    written["from_a_newer_version"] = {"x": 1}
    path.write_text(json.dumps(written))

    session.update_meta(status="paused", iteration=10, label="bridges")
    session.write_checkpoint(_arrays(), 10, [])
    meta = session.read_meta()
    assert meta["from_a_newer_version"] == {"x": 1}
    assert (meta["status"], meta["iteration"], meta["label"]) == ("paused", 10, "bridges")
    assert meta["checkpoint_iteration"] == 10
    assert meta["created"] == written["created"]
    with pytest.raises(ValueError, match="id cannot change"):
        session.update_meta(id="x")
    with pytest.raises(ValueError, match="not one of"):
        session.update_meta(status="sleeping")
    with pytest.raises(ValueError, match="missing lambdas"):
        create_session({k: v for k, v in _meta().items() if k != "lambdas"}, root)


def test_history_skips_a_torn_last_line_and_counts_bad_middle_lines(root):
    session = create_session(_meta(), root)
    point = {"iteration": 1, "xent": 2.0, "objective": 1.0, "act": 3.0, "token_ids": [5, 6], "text": "a\u2028b"}
    session.append_history([point, {**point, "iteration": 2}])
    with open(session.folder / "history.jsonl", "ab") as handle:
        handle.write(b"garbage\n")
    session.append_history([{**point, "iteration": 3}])
    with open(session.folder / "history.jsonl", "ab") as handle:
        handle.write(b'{"iteration": 4, "xe')  # a crash mid-append

    points, problems = session.read_history()
    assert [p["iteration"] for p in points] == [1, 2, 3] and points[0] == point
    assert problems == ["history.jsonl line 3: not valid JSON (line 1 column 1); skipped"]

    session.append_history([{**point, "iteration": 5}])  # after a crash: the torn line stays apart
    points, problems = session.read_history()
    assert [p["iteration"] for p in points] == [1, 2, 3, 5]
    assert len(problems) == 2 and problems[1].startswith("history.jsonl line 5: not valid JSON")


def test_listing_skips_broken_sessions_with_one_line_each(root, with_ids):
    with_ids("20261125-100000-aaaaaa", "20261125-110000-bbbbbb")
    good = create_session(_meta(), root)
    bad_checkpoint = create_session(_meta(label="x"), root)
    bad_checkpoint.write_checkpoint(_arrays(), 5, [])
    data = (bad_checkpoint.folder / "checkpoint.safetensors").read_bytes()
    (bad_checkpoint.folder / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    for name in ("20261125-120000-cccccc", "20261125-130000-dddddd", "20261125-140000-eeeeee"):
        (root / name).mkdir()
    (root / "20261125-120000-cccccc" / "session.json").write_text("{\"ve")
    (root / "20261125-140000-eeeeee" / ".session.json.x1y2.tmp").write_text("{")

    listed, problems = list_sessions(root)
    assert [s.id for s in listed] == [bad_checkpoint.id, good.id]  # newest first
    assert listed[0].label == "x" and listed[0].checkpoint_iteration == 5 and listed[1].features == [234]
    assert problems == ["20261125-140000-eeeeee: session.json: missing; skipped",
                        "20261125-130000-dddddd: session.json: missing; skipped",
                        "20261125-120000-cccccc: session.json: not valid JSON (line 1 column 2); skipped"]
    with pytest.raises(SessionError, match=r"checkpoint\.safetensors: not a valid safetensors file"):
        bad_checkpoint.read_checkpoint()
    with pytest.raises(SessionError, match=r"checkpoint\.safetensors: missing"):
        good.read_checkpoint()
    assert list_sessions(root / "nowhere") == ([], [])


def test_a_pickled_checkpoint_is_refused_without_unpickling(root, monkeypatch):
    session = create_session(_meta(), root)
    (session.folder / "checkpoint.safetensors").write_bytes(pickle.dumps({"tokens": np.arange(3)}))

    def never(*args, **kwargs):
        raise AssertionError("something tried to unpickle")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, never)
    monkeypatch.setattr(np, "load", never)
    with pytest.raises(SessionError, match=r"checkpoint\.safetensors: not a safetensors file") as err:
        session.read_checkpoint()
    assert "\n" not in str(err.value)


def test_find_by_id_prefix_or_hex_tail(root, with_ids):
    with_ids("20261125-100000-a1b2c3", "20261125-100500-a1ffff", "20261126-090000-0c0c0c")
    first, second, third = (create_session(_meta(), root) for _ in range(3))
    assert find_session(first.id, root) == first
    assert find_session("20261126", root) == third
    assert find_session("a1b", root) == first
    with pytest.raises(UserError, match="'20261125-10' is ambiguous: it matches 20261125-100500-a1ffff, "
                                        "20261125-100000-a1b2c3; give more"):
        find_session("20261125-10", root)
    with pytest.raises(UserError, match="no session '20261125-100000-a1b2c4'; did you mean '20261125-100000-a1b2c3'"):
        find_session("20261125-100000-a1b2c4", root)
    with pytest.raises(UserError, match="no session ''"):
        find_session("", root)


def test_delete_force_outlasts_a_process_still_writing_into_the_folder(root):
    """A worker's files appear (and renamed temp files vanish) while --force deletes, until it notices:
    one rmtree alone can fail or leave the folder behind; delete returns only once it is gone."""
    import threading

    session = create_session(_meta(), root)
    stop, written = threading.Event(), []

    def writer():  # as a worker checkpointing every iteration: a temp file, then a rename
        n = 0
        while not stop.is_set():
            n += 1
            if n > 20 and not (session.folder / "session.json").exists():
                return  # the worker's next lock sees its session gone and stops writing
            try:
                tmp = session.folder / f".elites.json.{n}.tmp"
                tmp.write_text("x" * 4096)
                tmp.rename(session.folder / f"file{n % 7}")
                written.append(n)
            except FileNotFoundError:
                return  # the folder is gone: a session write never recreates it

    thread = threading.Thread(target=writer)
    thread.start()
    while len(written) < 20:
        pass
    try:
        delete_session(session.id, root, force=True)
        assert not os.path.lexists(session.folder)
    finally:
        stop.set()
        thread.join()
    assert not os.path.lexists(session.folder)


def test_delete_refuses_running_sessions_and_paths_outside_the_root(root, tmp_path):
    session = create_session(_meta(), root)
    with pytest.raises(UserError, match="is running; stop it first"):
        delete_session(session.id, root)
    session.update_meta(status="stopped")
    delete_session(session.id, root)
    assert not session.folder.exists()

    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "session.json").write_text("{}")
    (root / "link").symlink_to(outside)
    for name in ("../precious", "link", "..", "", "nope"):
        with pytest.raises(UserError, match="no session"):
            delete_session(name, root, force=True)
    assert (outside / "session.json").exists()

    running = create_session(_meta(), root)
    delete_session(running.id, root, force=True)
    with pytest.raises(SessionError, match="the session folder is gone"):  # a worker still writing
        running.write_checkpoint(_arrays(), 1, [])
    assert not running.folder.exists()


def test_export_is_escaped_and_inert(root):
    session = create_session(_meta(label="<script>alert(1)</script>"), root)
    tokens = ["<|endoftext|>", " <script>alert('x')</script>", "\x1b[31m", " a|b", "\r"]
    session.write_checkpoint(_arrays(), 3, [_elite(tokens), _elite(tokens[:2], act=1.0)])
    session.append_history([{"iteration": 1, "xent": 2.0, "objective": 1.0, "act": 3.0, "token_ids": [1],
                             "text": "\x1b[2J<script>"},
                            {"iteration": 2, "xent": 3.0, "objective": 2.5, "act": 2.5, "token_ids": [2],
                             "text": "dominated"}])  # on (xent, act); its higher objective does not count
    with open(session.folder / "history.jsonl", "ab") as handle:
        handle.write(b"junk\n")
    session.update_meta(iteration=4, status="stopped", error="worker \x1b[1mdied")

    markdown = export_markdown(session)
    assert "\x1b" not in markdown and "\r" not in markdown and "<script>" not in markdown
    assert f"# EPO session `{session.id}`: feature 234" in markdown
    assert "Label: &lt;script&gt;alert\\(1\\)&lt;\\/script&gt;" in markdown
    assert "Model `gpt2` · SAE `gpt2-small-res-jb` at `blocks.8.hook_resid_pre`." in markdown
    time = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    assert re.search(f"Status stopped: iteration 4 of 750; created {time}, updated {time}\\.", markdown)
    assert "## Elites at iteration 3" in markdown and "### Elite 2" in markdown
    assert md_text("\x1b[31m") in markdown and "| 2 | \\\\x1b\\[31m | 2 | 2.500 |" in markdown
    assert "&lt;script&gt;" in markdown and " a\\|b" in markdown
    assert "| 2.000 | 1.000 | 3.000 | \\\\x1b\\[2J&lt;script&gt; |" in markdown  # on the frontier
    assert "dominated" not in markdown
    assert "(1 corrupt lines of history.jsonl skipped.)" in markdown

    fresh = create_session(_meta(), root)
    assert "No checkpoint saved yet" in export_markdown(fresh)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_leaves_the_previous_files_intact(root, monkeypatch):
    session = create_session(_meta(), root)
    session.write_checkpoint(_arrays(0), 1, [_elite(["<bos>", " a"])])
    before = {p.name: p.read_bytes() for p in session.folder.iterdir()}

    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(SessionError, match=r"checkpoint\.safetensors: could not write: No space left on device"):
        session.write_checkpoint(_arrays(1), 2, [_elite(["<bos>", " b"])])
    with pytest.raises(SessionError, match=r"session\.json: could not write: No space left on device"):
        session.update_meta(status="paused")
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in session.folder.iterdir()} == before  # no temp files either
    arrays, metadata = session.read_checkpoint()
    assert metadata["iteration"] == "1" and arrays["tokens_KxN"].tobytes() == _arrays(0)["tokens_KxN"].tobytes()
    assert session.read_meta()["status"] == "running"


def test_elites_write_failing_after_the_checkpoint_leaves_session_json_behind(root, monkeypatch):
    """A crash between files: session.json never points past what is on disk."""
    session = create_session(_meta(), root)
    session.write_checkpoint(_arrays(0), 1, [])
    calls = itertools.count()
    real = sessions.atomic.write_json_atomic

    def fail_on_elites(path, data, **options):
        if Path(path).name == "elites.json" and next(calls) == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **options)
    monkeypatch.setattr(sessions.atomic, "write_json_atomic", fail_on_elites)
    with pytest.raises(SessionError, match="elites.json"):
        session.write_checkpoint(_arrays(1), 2, [])
    assert session.read_meta()["checkpoint_iteration"] == 1
    assert session.read_checkpoint()[1]["iteration"] == "2"  # the newer state is complete on disk


def test_the_rate_behind_the_eta_leaves_out_the_compiling_first_iteration():
    from types import SimpleNamespace

    from epo_tui.engine.session_search import RecordedSearch

    def rate(seconds):
        return RecordedSearch.iterations_per_second(SimpleNamespace(seconds=seconds), window=3)

    assert rate([]) is None and rate([25.0]) is None  # no ETA from a compile
    assert rate([25.0, 2.0]) == pytest.approx(0.5)
    assert rate([25.0, 1.0, 1.0, 4.0, 4.0, 4.0]) == pytest.approx(0.25)  # the last 3 after the first


def test_probes_from_two_threads_never_see_each_other_as_a_runner(root):
    """The worker probes a session on its reader thread while its main thread may claim it: no attempt may
    take another thread's attempt for a process running the session."""
    session = create_session(_meta(), root)
    seen: list[bool] = []

    def probe() -> None:
        for _ in range(300):
            seen.append(session.is_running_elsewhere())

    threads = [threading.Thread(target=probe) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [False] * 900

    threads = [threading.Thread(target=probe) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in range(300):  # a claim beside the probes never fails (while it is held, they say so)
        session.claim().release()
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("attempt", ["claim", "probe"])
def test_a_runner_lock_taken_as_the_folder_is_deleted_does_not_make_it_again(root, monkeypatch, attempt):
    """FileLock creates a missing folder: a claim or a probe whose folder is deleted between its check and
    its lock must leave no folder behind (the browser probes while `sessions delete` runs)."""
    import shutil

    import filelock

    session = create_session(_meta(), root)

    class DeletedFirst(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            shutil.rmtree(session.folder)  # the delete lands just before the lock is taken
            return super().acquire(*args, **kwargs)

    monkeypatch.setattr(sessions.filelock, "FileLock", DeletedFirst)
    if attempt == "claim":
        with pytest.raises(sessions.SessionGone):
            session.claim()
    else:
        assert session.is_running_elsewhere() is False
    assert not session.folder.exists()

"""Issue 7 §4, security: (1) only safetensors are read, never a pickle, wherever weights or data come
from; (2) token text is inert in markdown exports and on the terminal; (3) the worker protocol and the
`--worker` command execute nothing they receive, and the code has no shell, eval or pickle use.

Every planted pickle is live: unpickling it creates a marker file (`test_the_bait_is_live` proves
it), so "the marker never appears" means the pickle was never unpickled. Case counts per item are in
the README's security table.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli

from epo_tui import protocol
from epo_tui.errors import UserError

TESTS = Path(__file__).resolve().parents[1]  # the helpers (fake_worker.py, tui_pilot.py) live there
REPO = TESTS.parent
FAKE_WORKER = TESTS / "fake_worker.py"
ESCAPES = (b"\x1b[2J", b"\x1b]52;c;RVZJTA", b"\x1b]8;;http://evil")  # as tests/fake_worker.py EVIL_TOKENS


class Bait:
    """Unpickling this creates `marker` (open(marker, "w")): proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, torch_format: bool = False) -> Path:
    """A live pickle at `path`: torch.save's zip format for .bin/.pt, else a plain pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        import torch

        torch.save({"weight": Bait(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": Bait(marker)}))
    return path


def assert_one_line(err: BaseException) -> str:
    message = str(err)
    assert message and "\n" not in message, message
    return message


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a planted pickle was unpickled"


def test_the_bait_is_live(tmp_path):
    import torch

    for i, torch_format in enumerate((False, True)):
        marker = tmp_path / f"m{i}"
        path = plant(tmp_path / f"bait{i}.bin", marker, torch_format)
        if torch_format:
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists()


# ---------------------------------------------------------------------------------------- 1. pickles


def _model_copy(tiny_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_dir / "model", dest)
    return dest


def _load_model(**kwargs):
    from epo_tui.config import ModelConfig
    from epo_tui.engine.language_model import load_model

    return load_model(ModelConfig(**{"name": None, **kwargs}))


def test_a_model_folder_with_only_pytorch_model_bin_is_refused(tiny_dir, tmp_path, marker):
    folder = _model_copy(tiny_dir, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    plant(folder / "pytorch_model.bin", marker, torch_format=True)
    with pytest.raises(UserError) as info:
        _load_model(path=str(folder))
    assert "holds no .safetensors weights" in assert_one_line(info.value)


def test_a_model_folder_with_both_reads_the_safetensors_and_never_opens_the_bin(tiny_dir, tmp_path, marker,
                                                                                opened_files):
    folder = _model_copy(tiny_dir, tmp_path / "model")
    plant(folder / "pytorch_model.bin", marker, torch_format=True)
    model = _load_model(path=str(folder))
    assert np.isfinite(np.asarray(model.forward(np.array([[0, 5, 9]]))[0])).all()
    assert not [p for p in opened_files if p.endswith("pytorch_model.bin")]


def test_safetensors_that_are_a_pickle_are_refused(tiny_dir, tmp_path, marker):
    folder = _model_copy(tiny_dir, tmp_path / "model")
    plant(folder / "model.safetensors", marker)
    with pytest.raises(UserError) as info:
        _load_model(path=str(folder))
    assert "cannot read the weights" in assert_one_line(info.value)


def test_a_hub_cache_snapshot_with_only_a_bin_is_refused(tiny_dir, marker):
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = Path(os.environ["HF_HOME"]) / "hub" / "models--evil-org--pickled"
    snapshot = _model_copy(tiny_dir, repo / "snapshots" / commit)
    (snapshot / "model.safetensors").unlink()
    plant(snapshot / "pytorch_model.bin", marker, torch_format=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    try:
        with pytest.raises(UserError) as info:
            _load_model(name="evil-org/pickled")
        assert assert_one_line(info.value)
    finally:
        shutil.rmtree(repo)


@pytest.mark.parametrize("weights", ["sae_weights.pt", "sae_weights.bin"])
def test_an_sae_folder_with_pickled_weights_is_refused(tiny_dir, tmp_path, marker, weights):
    from epo_tui.config import SAEConfig
    from epo_tui.engine.sae_loading import load_sae

    folder = tmp_path / "sae"
    shutil.copytree(tiny_dir / "sae", folder)
    (folder / "sae_weights.safetensors").unlink()
    plant(folder / weights, marker, torch_format=True)
    with pytest.raises(UserError) as info:
        load_sae(SAEConfig(release=None, id=None, path=str(folder)), cache_root=tmp_path / "cache")
    assert "not a sae-lens SAE folder" in assert_one_line(info.value)


def test_sae_weights_that_are_a_pickle_are_refused(tiny_dir, tmp_path, marker):
    from epo_tui.config import SAEConfig
    from epo_tui.engine.sae_loading import load_sae

    folder = tmp_path / "sae"
    shutil.copytree(tiny_dir / "sae", folder)
    plant(folder / "sae_weights.safetensors", marker)
    with pytest.raises(UserError) as info:
        load_sae(SAEConfig(release=None, id=None, path=str(folder)), cache_root=tmp_path / "cache")
    assert_one_line(info.value)


def test_a_sparsity_file_that_is_a_pickle_only_makes_liveness_unknown(tiny_dir, tmp_path, marker):
    from epo_tui.config import SAEConfig
    from epo_tui.engine.sae_loading import load_sae_with_density

    folder = tmp_path / "sae"
    shutil.copytree(tiny_dir / "sae", folder)
    plant(folder / "sparsity.safetensors", marker)
    sae, density = load_sae_with_density(SAEConfig(release=None, id=None, path=str(folder)),
                                         cache_root=tmp_path / "cache")
    assert density is None and sae.d_sae == 64


def test_a_converted_sae_cache_replaced_by_a_pickle_is_rebuilt_not_read(tiny_dir, tmp_path, marker):
    from epo_tui.config import SAEConfig
    from epo_tui.engine import sae_loading as sae_module

    cfg, cache = SAEConfig(release=None, id=None, path=str(tiny_dir / "sae")), tmp_path / "cache"
    first = sae_module.load_sae(cfg, cache_root=cache)
    entry = cache / "saes" / sae_module._cache_key(cfg, "config")
    weights = plant(entry / sae_module.WEIGHTS_FILE, marker)
    meta = json.loads((entry / sae_module.META_FILE).read_text())
    meta["weights_bytes"] = weights.stat().st_size  # so the cache reader gets as far as opening it
    (entry / sae_module.META_FILE).write_text(json.dumps(meta))
    again = sae_module.load_sae(cfg, cache_root=cache)
    np.testing.assert_array_equal(np.asarray(first.W_enc_DxS), np.asarray(again.W_enc_DxS))
    assert (entry / sae_module.WEIGHTS_FILE).read_bytes()[8:9] == b"{"  # rewritten as safetensors


def test_a_features_catalog_replaced_by_a_pickle_is_rebuilt(tiny_dir, tmp_path, marker, monkeypatch):
    from epo_tui import paths

    monkeypatch.chdir(tmp_path)
    config = str(tiny_dir / "config.toml")
    code, first, err = run_cli("features", "--config", config, "--json")
    assert code == 0, err
    catalogs = list((paths.cache_dir() / "catalogs").glob("*.json"))
    assert catalogs
    for path in catalogs:
        plant(path, marker)
    code, again, err = run_cli("features", "--config", config, "--json")
    assert code == 0 and again == first, err


@pytest.mark.slow
def test_a_session_checkpoint_replaced_by_a_pickle_is_refused(tiny_dir, tmp_path, marker, monkeypatch):
    from epo_tui import sessions

    monkeypatch.chdir(tmp_path)
    config = str(tiny_dir / "config.toml")
    code, out, err = run_cli("run", "--config", config, "--iterations", "3", "--out", tmp_path / "run")
    assert code == 0, err
    session = sessions.list_sessions()[0][0].session  # newest first
    plant(session.folder / sessions.CHECKPOINT_FILE, marker)
    with pytest.raises(sessions.SessionError) as info:
        session.read_checkpoint()
    assert "not a safetensors file" in assert_one_line(info.value)
    code, out, err = run_cli("run", "--config", config, "--resume", session.id, "--iterations", "6")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    # (tests/test_sessions.py covers truncated and corrupt checkpoints.)


@pytest.mark.parametrize("kind", ["raw-pickle", "npy-object-array"])
def test_a_vector_target_file_holding_a_pickle_is_refused(tmp_path, marker, kind):
    from epo_tui.engine.objective import _load_vector

    path = tmp_path / "vector.npy"
    if kind == "raw-pickle":
        plant(path, marker)
    else:
        np.save(path, np.array([Bait(marker)] * 32, dtype=object), allow_pickle=True)
    with pytest.raises(UserError) as info:
        _load_vector(str(path), 32)
    assert "feature.vector" in assert_one_line(info.value)


def test_a_labels_file_holding_a_pickle_is_not_unpickled(tmp_path, marker):
    from epo_tui.features import FeatureEntry, config_labels, with_labels
    from epo_tui.labels import LabelTarget

    path = plant(tmp_path / "labels.jsonl", marker)
    entries = [FeatureEntry(index=0, top_tokens=("a",), top_token_ids=(1,), label=None)]
    try:
        labelled = with_labels(entries, config_labels(str(path), LabelTarget(None, 1)).labels)
    except UserError as err:
        assert_one_line(err)
    else:
        assert [e.label for e in labelled] == [None]


# -- no unpickling at all during score + run + a worker session (in-process)


@pytest.fixture
def opened_files():
    """Paths opened through Python's open() while the test runs (an audit hook; it stays installed but
    records only while `_AUDIT` is on)."""
    _install_audit_hook()
    _AUDIT["opened"] = []
    _AUDIT["on"] = True
    yield _AUDIT["opened"]
    _AUDIT["on"] = False


_AUDIT: dict = {"on": False, "opened": [], "unpickled": [], "installed": False}


def _install_audit_hook() -> None:
    if _AUDIT["installed"]:
        return

    def hook(event, args):
        if not _AUDIT["on"]:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            _AUDIT["opened"].append(os.fsdecode(args[0]))
        elif event == "pickle.find_class":  # every unpickling of a class or function goes through here
            _AUDIT["unpickled"].append(f"{args[0]}.{args[1]}")

    sys.addaudithook(hook)
    _AUDIT["installed"] = True


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fails the test if anything unpickles: pickle.load/loads/Unpickler, torch.load, numpy.load with
    allow_pickle, or any find_class (the audit hook sees the C unpickler too)."""
    import torch

    calls: list[str] = []

    def refuse(name):
        def refused(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return refused

    real_np_load = np.load

    def np_load(*args, allow_pickle=False, **kwargs):
        if allow_pickle:
            calls.append("numpy.load(allow_pickle=True)")
        return real_np_load(*args, allow_pickle=allow_pickle, **kwargs)

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    monkeypatch.setattr(np, "load", np_load)
    _install_audit_hook()
    _AUDIT["unpickled"] = []
    _AUDIT["on"] = True
    yield calls
    _AUDIT["on"] = False
    assert not calls, calls
    assert not _AUDIT["unpickled"], _AUDIT["unpickled"]


class InProcessWorker:
    """epo_tui.engine.worker.serve() on a thread, fed through pipes; events parsed into a queue."""

    def __init__(self, sessions_root: Path):
        from epo_tui.engine.worker import serve

        command_r, self._command_w = os.pipe()
        event_r, event_w = os.pipe()
        self._stdin = os.fdopen(command_r, "rb")
        self._stdout = os.fdopen(event_w, "wb", buffering=0)
        self.events: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=lambda: serve(self._stdin, self._stdout, sessions_root), daemon=True)
        self.thread.start()
        threading.Thread(target=self._read, args=(os.fdopen(event_r, "rb"),), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.events.put(json.loads(line))
        self.events.put(None)

    def send_raw(self, line: bytes) -> None:
        os.write(self._command_w, line)

    def send(self, type_: str, id=None, **fields) -> None:
        self.send_raw(protocol.encode(protocol.COMMANDS[type_](id=id, **fields)))

    def expect(self, type_: str, id=None, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            assert event is not None, f"the worker ended waiting for {type_}"
            if event["type"] == type_ and (id is None or event.get("id") == id):
                return event
            if event["type"] == "error" and event.get("id") == id and id is not None:
                return event

    def close(self) -> None:
        os.close(self._command_w)  # end of input: shutdown
        self.thread.join(timeout=60)
        import logging

        from epo_tui.engine.worker import LogEvents

        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, LogEvents)]:
            root.removeHandler(handler)


@pytest.mark.slow
def test_score_run_and_a_worker_session_unpickle_nothing(tiny_dir, tmp_path, monkeypatch, no_unpickling):
    monkeypatch.chdir(tmp_path)
    config = str(tiny_dir / "config.toml")
    code, out, err = run_cli("score", "--config", config, "The quick brown fox")
    assert code == 0, err
    code, out, err = run_cli("run", "--config", config, "--iterations", "3", "--out", tmp_path / "run")
    assert code == 0, err
    worker = InProcessWorker(tmp_path / "sessions")
    try:
        worker.send("load", id="l", config_path=config)
        assert worker.expect("ready", id="l")["type"] == "ready"
        worker.send("features", id="f")
        assert worker.expect("features", id="f")["features"]
        worker.send("start", id="s", search={"iterations": 4}, checkpoint_seconds=0)
        session = worker.expect("started", id="s")["session"]
        worker.expect("finished")
        worker.send("score", id="c", text="hello world")
        assert worker.expect("scored", id="c")["tokens"]
        worker.send("start", id="r", resume=session, search={"iterations": 6})  # reads the checkpoint
        assert worker.expect("started", id="r")["iteration"] == 4
        worker.expect("finished")
    finally:
        worker.close()


# ------------------------------------------------------------------------------- 2. inert token text

EVIL = ["\x1b[2J", "\x1b]52;c;RVZJTA==\x07", "\x1b]8;;http://evil.example/\x1b\\link\x1b]8;;\x1b\\", "</code>", "```",
        "~~~", "<script>alert(1)</script>", "[x](javascript:alert(1))", "<!-- epo-tui favorite -->",
        "\n<!-- epo-tui favorite -->\n", "\u2028<!-- epo-tui favorite -->"]
CODE_SPAN = re.compile(r"`[^`\n]*`")
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _evil_elite(token: str):
    from epo_tui.protocol import Elite

    tokens = ["<|endoftext|>", token, " and", token]
    return Elite(penalty=1.0, token_ids=[0, 1, 2, 1], tokens=tokens, activations=[0.0, 1.0, 0.5, 2.0],
                 prompt_start=1, act=2.0, xent=4.0, objective=2.0, text="".join(tokens[1:]))


@pytest.mark.parametrize("token", EVIL)
def test_favorites_keep_evil_tokens_inert_and_entries_countable(tmp_path, token):
    from epo_tui import favorites

    meta = {"id": "s1", "label": token, "model": token, "sae": {"name": token, "hook": "blocks.0.hook_resid_pre"},
            "feature": {"indices": [3]}}
    path = tmp_path / "favorites.md"
    for _ in range(2):
        favorites.append_favorite(path, favorites.favorite_from_elite(meta, _evil_elite(token)))
    text = path.read_text(encoding="utf-8")
    assert not RAW_CONTROL.search(text)
    entries = favorites.read_favorites(path)
    assert len(entries) == 2  # the entry marker in token text forges no entry
    lines = entries[0].splitlines()
    opening = next(i for i, line in enumerate(lines) if line.startswith("~~~"))
    fence = lines[opening].removesuffix("text")
    assert lines[opening + 2] == fence  # the prompt is one line; token text cannot close the fence early
    # outside the fence and the code spans (literal in CommonMark; code_span() turns backticks into
    # quotes), token text adds no markup
    outside = CODE_SPAN.sub("", "\n".join(lines[:opening] + lines[opening + 3:]))
    for raw in ("<script>", "</code>", "<!--", "](javascript:"):
        assert raw not in outside.replace(favorites.MARKER, "", 1), raw
    # (tests/test_favorites.py covers more hostile strings against the exact entry format.)


def test_session_export_keeps_evil_tokens_inert(tiny_dir, tmp_path, monkeypatch):
    from epo_tui import sessions

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("run", "--config", str(tiny_dir / "config.toml"), "--iterations", "3",
                             "--out", tmp_path / "run")
    assert code == 0, err
    session = sessions.list_sessions()[0][0].session
    elites_path = session.folder / "elites.json"
    data = json.loads(elites_path.read_text())
    elites = data["elites"] if isinstance(data, dict) else data
    for k, elite in enumerate(elites):
        token = EVIL[k % len(EVIL)]
        start = elite["prompt_start"]
        elite["tokens"] = elite["tokens"][:start] + [token] * (len(elite["tokens"]) - start)
        elite["text"] = "".join(elite["tokens"][start:])
    elites_path.write_text(json.dumps(data))
    session.append_history([{"iteration": 1, "xent": 0.5, "objective": 9.0, "act": 9.0, "token_ids": [1],
                             "text": "".join(EVIL)}])
    code, out, err = run_cli("sessions", "export", session.id)
    assert code == 0, err
    assert not RAW_CONTROL.search(out), repr(RAW_CONTROL.search(out))
    markup = CODE_SPAN.sub("", out)
    assert "\x1b" not in out and "<script>" not in markup and "<!-- epo-tui favorite -->" not in markup
    assert "](javascript:" not in markup and "</code>" not in markup
    code, shown, err = run_cli("sessions", "show", session.id)
    assert code == 0 and "\x1b" not in shown


async def _evil_app_scenario(app) -> None:
    from tui_pilot import ready, until

    from epo_tui.tui.components.elites import ElitesPane

    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot)
        await pilot.press("s")
        await until(pilot, lambda: app.query_one(ElitesPane).selected_elite is not None, "the evil elites")
        await pilot.pause(0.5)
        for widget in app.screen.walk_children():
            for line in range(widget.size.height):
                try:
                    strip = widget.render_line(line)
                except Exception:  # noqa: BLE001 - not every widget renders lines on demand
                    break
                assert "\x1b" not in strip.text and not RAW_CONTROL.search(strip.text), (widget, strip.text)
        svg = app.export_screenshot()
        assert "\x1b" not in svg and "<script>" not in svg
        await pilot.press("d")  # the details screen shows the selected elite's tokens one per row
        await pilot.pause(0.5)
        assert "\x1b" not in app.export_screenshot()
        await pilot.press("escape", "q")


def test_the_ui_renders_evil_tokens_inert_headless(tmp_path, monkeypatch):
    from tui_pilot import fake_app

    monkeypatch.chdir(tmp_path)
    app = fake_app()
    app.client.command[app.client.command.index("ui")] = "ui-evil"
    asyncio.run(_evil_app_scenario(app))


PTY_CHILD = r"""
import dataclasses, fcntl, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the controlling terminal (as bench_ui does)
sys.path.insert(0, {tests!r})
from epo_tui.config import Config, FeatureConfig
from epo_tui.tui.app import EpoApp, LoadSpec
app = EpoApp(dataclasses.replace(Config(), feature=FeatureConfig(index=24)), LoadSpec({{"demo": True}}),
             worker_command=[sys.executable, {fake!r}, "ui-evil"])
app.run()
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_no_escape_sequence_from_token_text_reaches_a_real_terminal(tmp_path):
    """The app on a pty (as `epo-tui bench --ui` runs it) with elites made of escape sequences: the
    bytes written to the terminal hold none of them raw (clear screen, OSC 52, OSC 8)."""
    import select

    master, slave = os.openpty()
    os.set_blocking(master, False)
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 36, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TEXTUAL_COLOR_SYSTEM")}
    env.update(TERM="xterm-256color", COLORTERM="truecolor", PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", PTY_CHILD.format(tests=str(TESTS),
                                                                     fake=str(FAKE_WORKER))],
                             stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path, env=env,
                             start_new_session=True, close_fds=True)
    os.close(slave)
    output = bytearray()

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    output.extend(os.read(master, 65536))
                except OSError:
                    return

    try:
        pump(6.0)  # start-up, features
        for key, wait in ((b"s", 3.0), (b"d", 1.5), (b"\x1b", 1.0), (b"q", 4.0)):
            os.write(master, key)
            pump(wait)
    finally:
        if child.poll() is None:  # the app quits on q; a slow exit is not what this test checks
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        os.close(master)
    if os.environ.get("EPO_TUI_PTY_DUMP"):
        Path(os.environ["EPO_TUI_PTY_DUMP"]).write_bytes(bytes(output))
    assert b"EVIL" in output, "the evil elites were never drawn"
    for sequence in ESCAPES:
        assert sequence not in bytes(output), sequence


# The `epo-tui score` output (plain, coloured and --json) with control characters in the text is covered
# by tests/cli/test_bad_input_text.py (test_control_characters_*, test_markup_in_tokens_is_printed_as_text).


# -------------------------------------------------------------------------- 3. nothing is executed

SHELLY = ["$(touch {m})", "`touch {m}`", "; touch {m}", "&& touch {m}", "| touch {m}",
          "__import__('os').system('touch {m}')", "{{{{7*7}}}} ${{touch {m}}}"]


@pytest.mark.slow
def test_the_worker_executes_nothing_it_receives(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    worker = InProcessWorker(tmp_path / "sessions")
    tried = 0
    try:
        config = json.loads(json.dumps(_tiny_config_dict(tiny_dir)))
        for n, template in enumerate(SHELLY):
            evil = template.format(m=marker)
            worker.send("load", id=f"p{n}", config_path=evil)
            assert worker.expect("error", id=f"p{n}")["kind"] in ("config", "input")  # no such file
            bad = json.loads(json.dumps(config))
            bad["model"]["path"] = evil
            worker.send("load", id=f"c{n}", config=bad)
            assert worker.expect("error", id=f"c{n}")["kind"] in ("config", "input")
            tried += 2
        for n, line in enumerate([
                {"v": 1, "type": "hello", "id": 1, "__class__": "os.system"},
                {"v": 1, "type": "score", "id": 2, "text": "x", "__reduce__": ["os.system", ["touch M"]]},
                {"v": 1, "type": "__import__", "id": 3},
                {"v": 1, "type": "load", "id": 4, "config": {"__class__": {"__reduce__": "os.system"}}},
                {"v": 1, "type": "start", "id": 5, "feature": {"__reduce__": "x"}},
                {"v": 1, "type": "start", "id": 6, "search": {"__init__": 1}}]):
            worker.send_raw((json.dumps(line) + "\n").encode())
            assert worker.expect("error", id=line["id"])["kind"] in ("protocol", "config", "input")
            tried += 1
        worker.send("load", id="ok", config=config)
        assert worker.expect("ready", id="ok")["type"] == "ready"
        for n, template in enumerate(SHELLY):
            evil = template.format(m=marker)
            worker.send("score", id=f"s{n}", text=evil)
            scored = worker.expect("scored", id=f"s{n}")
            assert "".join(scored["tokens"][1:]) == evil  # plain text, tokenized
            tried += 1
        worker.send("start", id="st", seed_prompt=SHELLY[0].format(m=marker), search={"iterations": 100_000},
                    checkpoint_seconds=0)  # still running when inject arrives
        assert worker.expect("started", id="st")["type"] == "started"
        worker.send("inject", id="in", text=SHELLY[5].format(m=marker))
        injected = worker.expect("injected", id="in")
        assert injected["type"] == "injected", injected  # plain text, put into the population
        worker.send("stop", id="x")
        worker.expect("finished")
        tried += 2
    finally:
        worker.close()
    assert tried == 3 * len(SHELLY) + 6 + 2  # 29 commands
    assert not marker.exists() and not (tmp_path / "M").exists()


def _tiny_config_dict(tiny_dir: Path) -> dict:
    from epo_tui.config import load_config

    config = load_config(str(tiny_dir / "config.toml"))
    return config.to_dict()


@pytest.mark.parametrize("template", [
    "{py} -c 'print(1)' ; touch {m}", "{py} -c 'print(1)' && touch {m}", "{py} -c 'print(1)' $(touch {m})",
    "{py} -c 'print(1)' `touch {m}`", "{py} -c 'print(1)' | touch {m}", "{py} -c 'print(1)' > {m}",
])
def test_a_worker_command_runs_without_a_shell(tmp_path, template):
    from epo_tui.client import WorkerClient, worker_command

    marker = tmp_path / "MARKER"
    argv = worker_command(template.format(py=sys.executable, m=marker))
    assert argv[:3] == [sys.executable, "-c", "print(1)"]  # the rest are plain arguments to python

    async def scenario() -> list[dict]:
        client = WorkerClient(argv)
        events = client.bus.subscribe()
        await client.start()
        seen = []
        async for event in events:
            seen.append(event)
            if isinstance(event, protocol.WorkerExited) or (isinstance(event, protocol.Error)
                                                              and event.kind != "protocol"):
                break
        await client.close()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert any(isinstance(e, protocol.Error) and e.kind == "protocol" for e in seen)  # "1" is not JSON
    assert not marker.exists()


def test_a_worker_command_string_is_never_given_to_a_shell():
    from epo_tui.client import WorkerClient

    with pytest.raises(TypeError):
        WorkerClient("python -m epo_tui worker; touch MARKER")  # type: ignore[arg-type]


# Forbidden in epo_tui/: (pattern, why). ALLOWED lists (file, pattern) pairs with a legitimate use.
FORBIDDEN = [
    (r"shell\s*=\s*True", "a shell"), (r"\bos\.system\(", "a shell"), (r"\bos\.popen\(", "a shell"),
    (r"create_subprocess_shell", "a shell"), (r"\bcommands\.getoutput", "a shell"),
    (r"(?<![\w.])eval\(", "eval"), (r"(?<![\w.])exec\(", "exec"), (r"\bcompile\([^)]*['\"]exec['\"]", "exec"),
    (r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|joblib|marshal|shelve)\b", "a pickle import"),
    (r"allow_pickle\s*=\s*True", "pickles in numpy"), (r"\btorch\.load\(", "torch pickles"),
    (r"weights_only\s*=\s*False", "torch pickles"), (r"\byaml\.(unsafe_)?load\(", "yaml objects"),
    (r"\bpickle\.loads?\(", "a pickle load"), (r"\b__import__\(", "dynamic imports"),
]
ALLOWED: set[tuple[str, str]] = set()


def test_the_code_has_no_shell_eval_or_pickle_use():
    found = []
    files = sorted((REPO / "epo_tui").rglob("*.py"))
    assert len(files) > 30
    for path in files:
        rel = str(path.relative_to(REPO))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pattern, why in FORBIDDEN:
                if re.search(pattern, line) and (rel, pattern) not in ALLOWED:
                    found.append(f"{rel}:{number}: {why}: {line.strip()}")
    assert not found, "\n".join(found)

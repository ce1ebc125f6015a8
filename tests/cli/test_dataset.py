"""`epo-tui dataset`: a local pass over text becomes the SAE's dataset statistics; it resumes after SIGKILL
with the same statistics, a finished pass is not run again, and bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli

from epo_tui import dataset_stats, paths
from epo_tui.engine import dataset_job

HELDOUT = paths.demo_pack() / "heldout.jsonl"


@pytest.fixture(autouse=True)
def _own_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("make_args, says", [
    (lambda tmp: ["--text", tmp / "missing.txt"], "does not exist"),
    (lambda tmp: ["--text", tmp], "is not a file"),
    (lambda tmp: ["--text", _file(tmp / "empty.txt", " \n\n")], "the text is empty"),
    (lambda tmp: ["--jsonl", _file(tmp / "empty.jsonl", "")], "the text is empty"),
    (lambda tmp: ["--jsonl", _file(tmp / "bad.jsonl", '{"text": "fine"}\n{"title": "no text"}\n')],
     "bad.jsonl:2: expected a JSON object with a string 'text' field"),
    (lambda tmp: ["--jsonl", _file(tmp / "bad.jsonl", '{"text": 5}\n')], "bad.jsonl:1"),
    (lambda tmp: ["--text", _file(tmp / "a.txt", "some text"), "--tokens", 0], "--tokens: must be >= 1, found 0"),
    (lambda tmp: ["--text", _file(tmp / "a.txt", "some text"), "--top-k", 0], "--top-k: must be >= 1"),
    (lambda tmp: ["--text", _file(tmp / "a.txt", "some text"), "--context", 1], "--context: must be >= 2"),
    (lambda tmp: [], "give the text to read"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, make_args, says):
    code, out, err = run_cli("dataset", "--demo", *make_args(tmp_path))
    assert says in _one_error_line(code, err) and out == ""


def test_text_and_jsonl_are_one_or_the_other(tmp_path):
    a = _file(tmp_path / "a.txt", "x")
    code, _, err = run_cli("dataset", "--demo", "--text", a, "--jsonl", a)
    assert "not allowed with argument" in _one_error_line(code, err)


def _file(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_pass_goes_into_the_sae_store_and_is_not_run_twice(tmp_path, tiny_dir):
    config = tiny_dir / "config.toml"
    text = _file(tmp_path / "doc.txt", "Debian packages are installed with apt. Python modules are imported. " * 8)
    code, out, err = run_cli("dataset", "--config", config, "--text", text, "--context", 32, "--top-k", 3,
                             "--batch-size", 4)
    assert code == 0, err
    assert out.startswith("dataset statistics of 64 latents") and "tokens/s" in out and "top 3" in out
    assert "epo-tui: dataset: " in err  # the start line (stderr is not a terminal here: no bar)
    key = dataset_stats.sae_key(str(tiny_dir / "model"), str(tiny_dir / "sae"))
    stats = dataset_stats.load_best_stats(key)
    assert stats.folder == dataset_stats.stats_folder(key, dataset_stats.LOCAL)
    assert stats.provenance["origin"] == "local" and stats.provenance["text"] == "doc.txt"
    fired = np.flatnonzero(stats.max_F > 0)
    assert len(fired) > 3 and np.isfinite(stats.density_F).all()
    first = stats.examples(int(fired[0]))
    assert 1 <= len(first) <= 3 and first[0].max_value == pytest.approx(stats.max(int(fired[0])))
    assert stats.histogram(int(fired[0])).percentile(first[0].max_value) == 100.0
    code, again, err = run_cli("dataset", "--config", config, "--text", text, "--context", 32, "--top-k", 3,
                               "--batch-size", 4)
    assert code == 0 and again.startswith("already computed, not run again: dataset statistics"), err
    # another pass replaces the store; the first one, rerun, writes its statistics back from its cache
    other = _file(tmp_path / "other.txt", "Another text altogether, about files and functions. " * 4)
    assert run_cli("dataset", "--config", config, "--text", other, "--context", 32, "--top-k", 3)[0] == 0
    assert dataset_stats.load_best_stats(key).provenance["text"] == "other.txt"
    code, out, err = run_cli("dataset", "--config", config, "--text", text, "--context", 32, "--top-k", 3)
    assert code == 0 and "resuming from row" in err and out.startswith("dataset statistics"), err
    assert dataset_stats.load_best_stats(key).provenance["text"] == "doc.txt"


def _demo_key() -> str:
    from epo_tui.config import load_config

    config = load_config(str(paths.demo_config_file()))
    return dataset_stats.sae_key(config.model.path, config.sae.path)


def _store_contents(folder: Path) -> tuple[dict, list]:
    stats = dataset_stats.load_stats(folder)
    arrays = {"max_F": stats.max_F, "density_F": stats.density_F, "counts": stats.histogram_counts_FxB,
              "edges": stats.histogram_edges_FxE}
    examples = [(int(i), stats.examples(int(i))) for i in stats.indices_with_examples()]
    return arrays, examples


@pytest.mark.slow
def test_a_pass_killed_with_sigkill_resumes_to_the_same_statistics(tmp_path):
    args = ["dataset", "--demo", "--jsonl", str(HELDOUT), "--tokens", "12000", "--context", "64",
            "--top-k", "4", "--batch-size", "4", "--checkpoint-every", "1"]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "killed-data"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    child = subprocess.Popen([sys.executable, "-c", "import sys; from epo_tui.cli import main; sys.exit(main())",
                              *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "cache" / "epo-tui" / "dataset"
    try:
        while not list(cache.glob(f"*/{dataset_job.CHECKPOINT_FILE}")):  # the first checkpoint
            assert child.poll() is None, child.communicate()
            try:
                child.wait(timeout=0.01)  # polls the folder; a child that ends early fails above
            except subprocess.TimeoutExpired:
                pass
        child.send_signal(signal.SIGKILL)
        child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    checkpoint = next(cache.glob(f"*/{dataset_job.CHECKPOINT_FILE}"))
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="numpy") as handle:
        meta = handle.metadata()
    assert 0 < int(meta["rows_done"]) < int(meta["rows"])  # killed part way
    assert not list(cache.glob(f"*/{dataset_job.SUMMARY_FILE}"))

    os.environ["XDG_DATA_HOME"] = env["XDG_DATA_HOME"]  # the rerun: same cache, same data folder
    code, out, err = run_cli(*args)
    assert code == 0 and "resuming from row" in err and out.startswith("dataset statistics"), err
    key = _demo_key()
    resumed = _store_contents(dataset_stats.stats_folder(key, dataset_stats.LOCAL))

    os.environ["XDG_DATA_HOME"] = str(tmp_path / "whole-data")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "whole-cache")
    code, out, err = run_cli(*args)
    assert code == 0 and "resuming" not in err, err
    whole = _store_contents(dataset_stats.stats_folder(key, dataset_stats.LOCAL))
    for name, array in whole[0].items():
        np.testing.assert_array_equal(resumed[0][name], array, err_msg=name)  # bitwise
    assert resumed[1] == whole[1]
    summary = json.loads((cache / checkpoint.parent.name / dataset_job.SUMMARY_FILE).read_text())
    assert summary["rows"] == int(meta["rows"])


def test_the_rate_leaves_out_the_first_batch_which_compiles(capsys):
    from epo_tui.progress import dataset_progress

    with dataset_progress() as display:  # stderr is not a terminal here: lines
        display.start(10, 1270, 0, 0)
        assert display.rate() == "compiling…"
        display.advance(4, 508, 30.0)
        display.advance(8, 508, 2.0)
        assert display.rate() == "254 tokens/s"
    assert capsys.readouterr().err == "epo-tui: dataset: 10 rows, 1,270 tokens\n"

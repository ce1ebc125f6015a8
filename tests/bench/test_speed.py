"""`epo-tui bench` on the tiny model: the JSON report has every figure, and each is a sane number.

No timing is asserted (this machine is shared); only that the figures exist, are finite and positive,
and that the structural checks hold.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from epo_tui import cli
from epo_tui.bench import speed


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_tiny_json_has_every_figure(tiny_dir, monkeypatch, capsys):
    config = speed.tiny_config_path(tiny_dir)  # already written: returned as is
    assert config == tiny_dir / "config.toml"
    monkeypatch.setattr(speed, "tiny_config_path", lambda folder=None: config)
    monkeypatch.setattr(speed, "PEAK_SIZES", (256, 512))  # a quick peak; the real one goes up to 4096
    # the fresh-process timings run alongside (their numbers are not checked, so sharing the cores is fine)
    with ThreadPoolExecutor(1) as pool:
        warm_future = pool.submit(speed.warm_start, config, 1)
        assert cli.main(["bench", "--model", "tiny", "--iterations", "2", "--no-warm-start", "--json"]) == 0
        warm = warm_future.result()
    out = capsys.readouterr()
    report = json.loads(out.out)  # stdout is exactly one JSON object; progress went to stderr
    assert "[tiny] iteration 2/2" in out.err

    assert set(report) >= {"machine", "peak", "setups", "warm_start", "goals"}
    assert report["warm_start"] is None
    assert _positive(report["peak"]["flops_per_s"])
    (setup,) = report["setups"]
    assert setup["name"] == "tiny" and setup["iterations"] == 2 and len(setup["per_iteration"]) == 2
    for step in ("gradients", "proposals", "evaluation", "selection", "total"):
        assert _positive(setup["mean_s"][step]), step
    for key in ("first_iteration_s", "time_to_first_iteration_s", "candidates_per_s", "tokens_per_s"):
        assert _positive(setup[key]), key
    xla, analytic = setup["flops_per_iteration"]["xla"], setup["flops_per_iteration"]["analytic"]
    for counts in (xla, analytic):
        for step in ("gradients", "evaluation", "total"):
            assert _positive(counts[step]), step
    # XLA's count and ours agree to within a factor (elementwise work is only in XLA's)
    assert 0.5 < xla["total"] / analytic["total"] < 2.0
    for name, value in setup["mfu"].items():
        assert _positive(value) and value < 1.5, name
    assert _positive(setup["flops_per_s"]["iteration_xla"])
    assert setup["checks"]["prefix"]["prefix_computed_once"]
    assert setup["checks"]["gradients"]["no_weight_gradients"]
    assert all(isinstance(goal["met"], bool) for goal in report["goals"])

    assert _positive(warm["cold_s"]) and _positive(warm["warm_s"])
    assert set(warm["warm_phases_s"]) >= {"import_jax", "load_model_and_sae", "first_iteration"}
    assert all(_positive(v) for v in warm["cold_phases_s"].values())
    goals = speed.goals({**report, "warm_start": warm})
    assert "warm start to first finished iteration (tiny)" in {goal["goal"] for goal in goals}


def test_enable_compile_cache_uses_the_cache_folder_or_the_override(monkeypatch, tmp_path):
    from epo_tui import paths
    from epo_tui.engine.compile_cache import ENV_VAR, compile_cache_dir

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert compile_cache_dir() == paths.cache_dir() / "jax"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "jc"))
    assert compile_cache_dir() == tmp_path / "jc"
    monkeypatch.setenv(ENV_VAR, "off")
    assert compile_cache_dir() is None


def test_bench_rejects_bad_iterations(capsys):
    assert cli.main(["bench", "--model", "tiny", "--iterations", "0"]) == cli.EXIT_USAGE
    assert "--iterations" in capsys.readouterr().err


def test_compile_cache_fills_its_folder(tmp_path):
    """A fresh process with the cache on leaves its compiled steps in the folder (small ones too)."""
    folder = tmp_path / "jc"
    code = ("import jax, jax.numpy as jnp\n"
            "from epo_tui.engine.compile_cache import enable_compile_cache\n"
            "print(enable_compile_cache())\n"
            "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EPO_TUI_JAX_CACHE": str(folder)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(folder)
    assert any(folder.iterdir())


@pytest.mark.slow
def test_bench_shapes_runs_every_setup_and_reports_each(tmp_path):
    """python -m epo_tui.bench.shapes (the GPU figures in the README): every setup, with a family at
    its real shapes loaded through load_model, reports its seconds per iteration (small search sizes here)."""
    from epo_tui.bench.shapes import main

    out = tmp_path / "shapes.json"
    assert main(["--out", str(out), "--iterations", "2", "--small", "--family", "pythia-70m"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["setup"], r["dtype"]) for r in runs] == [("gpt2", "float32"), ("gpt2", "float32"),
                                                      ("gpt2", "bfloat16"), ("gpt2", "bfloat16"),
                                                      ("pythia-70m", "bfloat16")]
    assert all(r["median_s"] > 0 and r["elites"] == 2 for r in runs)
    assert runs[-1]["params"] > 60e6  # Pythia-70m's real shapes, not a tiny model

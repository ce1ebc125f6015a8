"""Traced steps kept on disk (engine/export_cache.py): a later process loads them instead of tracing,
and runs exactly what the first one ran."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epo_tui.engine import export_cache
from epo_tui.engine.export_cache import ExportedJit

# a fresh process: a short search on the tiny model with the caches in argv[2]; prints its elites and
# how many times Python ran the model's forward (0 when every step was loaded from the cache)
SEARCH = r"""
import json, sys
import epo_tui.engine.models.gpt2 as gpt2
calls = []
real = gpt2.forward
gpt2.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
from epo_tui.engine.compile_cache import enable_compile_cache
enable_compile_cache(sys.argv[2])
from epo_tui.config import load_config
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.reporting import elite_reports
from epo_tui.engine.search import Search
config = load_config(sys.argv[1])
search = Search(load_model_with_sae(config), config)
state = search.initial_state()
for _ in range(3):
    state, _ = search.step(state)
reports = elite_reports(search, state)
print(json.dumps({"forward_traces": len(calls), "tokens": state.tokens_KxN.tolist(),
                  "objective": state.objective_K.tolist(), "activations": [r.activations for r in reports]}))
"""


def _search_process(tiny_dir, cache) -> dict:
    """`cache` None: both caches off (every step plain jax.jit)."""
    env = {**os.environ, "EPO_TUI_JAX_CACHE": str(cache or "off")}
    code = SEARCH if cache else SEARCH.replace("enable_compile_cache(sys.argv[2])", "")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_dir / "config.toml"), str(cache)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_traces_nothing_and_runs_the_same_search_as_plain_jit(tiny_dir, tmp_path):
    cache = tmp_path / "jax"
    first = _search_process(tiny_dir, cache)
    entries = sorted(p.name.split("-")[0] for p in (cache / "exported").iterdir())
    assert {"epo_tui.engine.search.gradients", "epo_tui.engine.search.propose", "full_evaluator",
            "suffix_evaluator", "run_model"} <= set(entries)
    second = _search_process(tiny_dir, cache)
    assert first["forward_traces"] > 0 and second["forward_traces"] == 0
    plain = _search_process(tiny_dir, None)
    for name in ("tokens", "objective", "activations"):
        assert second[name] == first[name], name  # bitwise: the same module ran
        assert plain[name] == first[name], name  # and it is the module plain jit runs


def _double_plus(x, y, *, scale):
    return {"sum": x * scale + y, "parts": (x, y)}


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    monkeypatch.setattr(export_cache, "_folder", lambda: tmp_path / "exported")
    return tmp_path / "exported"


def test_an_entry_is_written_once_and_read_back(cache_on):
    step = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))
    x, y = jnp.arange(3.0), jnp.ones(3)
    out = step(x, y, scale=2.0)
    np.testing.assert_array_equal(out["sum"], [1.0, 3.0, 5.0])
    assert isinstance(out["parts"], tuple)
    (entry,) = cache_on.iterdir()
    again = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))  # as a new process would
    np.testing.assert_array_equal(again(x, y, scale=2.0)["sum"], out["sum"])
    assert list(cache_on.iterdir()) == [entry]
    again(x, y, scale=3.0)  # another static value, another entry
    again(jnp.arange(4.0), jnp.ones(4), scale=2.0)  # another shape, another entry
    assert len(list(cache_on.iterdir())) == 3


def test_past_the_cap_the_oldest_entries_go(cache_on, monkeypatch):
    monkeypatch.setattr(export_cache, "KEPT_ENTRIES", 2)
    step = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))
    for n in (2, 3, 4):
        step(jnp.arange(float(n)), jnp.ones(n), scale=1.0)
        newest = max(cache_on.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        os.utime(newest, ns=(n * 10**9, n * 10**9))  # written in this order, whatever the clock's resolution
    assert len(list(cache_on.iterdir())) == 2
    survivors = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))
    survivors(jnp.arange(4.0), jnp.ones(4), scale=1.0)  # the newest is read back, not written again
    assert len(list(cache_on.iterdir())) == 2


def test_a_damaged_entry_is_exported_afresh(cache_on):
    step = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))
    step(jnp.arange(3.0), jnp.ones(3), scale=2.0)
    (entry,) = cache_on.iterdir()
    entry.write_bytes(entry.read_bytes()[:40])
    fresh = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))
    np.testing.assert_array_equal(fresh(jnp.arange(3.0), jnp.ones(3), scale=2.0)["sum"], [1.0, 3.0, 5.0])
    assert len(entry.read_bytes()) > 40


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_an_entry_that_is_a_pickle_runs_no_code(cache_on, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))
    step(jnp.arange(3.0), jnp.ones(3), scale=2.0)
    (entry,) = cache_on.iterdir()
    entry.write_bytes(pickle.dumps(_Payload()))  # entries are read by jax.export, never unpickled
    fresh = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))
    np.testing.assert_array_equal(fresh(jnp.arange(3.0), jnp.ones(3), scale=2.0)["sum"], [1.0, 3.0, 5.0])
    assert not (tmp_path / "PWNED").exists()


def test_statics_printed_with_an_address_are_never_saved(cache_on):
    class Opaque:  # hashable, but its text differs in every process
        pass

    step = ExportedJit(lambda x, *, tag: x + 1, "opaque", static_argnames=("tag",))
    np.testing.assert_array_equal(step(jnp.zeros(2), tag=Opaque()), [1.0, 1.0])
    assert not cache_on.exists() or not list(cache_on.iterdir())


def test_steps_are_plain_jit_while_the_compilation_cache_is_off(tmp_path, monkeypatch):
    previous = jax.config.values.get("jax_compilation_cache_dir")
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert export_cache._folder() == tmp_path / "exported"  # beside the compiled executables
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
    monkeypatch.setattr(export_cache, "_folder", lambda: None)
    step = ExportedJit(_double_plus, "double_plus", static_argnames=("scale",))
    np.testing.assert_array_equal(step(jnp.arange(3.0), jnp.ones(3), scale=2.0)["sum"], [1.0, 3.0, 5.0])
    assert not step._loaded and step.cache_size() == 1

"""Weights split over a model axis (4 and 8 simulated CPU devices) compute what one device computes.

For the tiny GPT-2 and the tiny Gemma 2, on ("data", "model") meshes with model axes of 2 and 4: the
logits and hook activations (heads and MLP units included) equal a single device's within 1e-5; the
search's scores do too, and the same seed gives the same elites. Each run checks that the weights are
really split (a device holds a quarter of an MLP matrix), so the test cannot pass with everything
replicated. A config's `[model] model_parallel` reaches `score` and the worker.

XLA_FLAGS must be set before jax is imported, so each device count runs in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from epo_tui.engine.tiny import main as write_tiny

HOOKS = ("blocks.0.attn.hook_z", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post")
ITERATIONS = 3
SEARCH = {"elites": 3, "candidates": 7, "seed": 3}  # 21 children: a data axis of 2 or 4 pads them

SCRIPT = textwrap.dedent("""
    import json, sys
    from dataclasses import replace

    import jax
    import jax.numpy as jnp
    import numpy as np

    from epo_tui.config import load_config
    from epo_tui.engine import sharding
    from epo_tui.engine.language_model import run_model
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.scoring import score_text
    from epo_tui.engine.search import Search

    configs, meshes, hooks, iterations, search_fields = (json.loads(a) for a in sys.argv[1:6])
    TEXT = "The quick brown fox jumps over the lazy dog"
    out = {"devices": jax.local_device_count()}
    for family, path in configs.items():
        if family == "configured":
            continue
        config = load_config(path)
        config = replace(config, search=replace(config.search, **search_fields))
        pair = load_model_with_sae(config)
        ids = jnp.asarray([pair.model.encode(TEXT)], jnp.int32)
        fixed = np.array(ids[:, 1:1 + config.search.prompt_tokens].repeat(5, axis=0))  # scored on every mesh
        fixed[1:, -1] = np.arange(4) + 40
        runs = out[family] = {}
        for devices, model in meshes:
            mesh = sharding.make_mesh(model, jax.local_devices()[:devices])
            params, sae = pair.placed(mesh)
            logits, acts, _ = run_model(params, ids, None, model_type=pair.model.model_type, cfg=pair.model.cfg,
                                        hooks=tuple(hooks) + (pair.sae.read_hook,), logits=True,
                                        center_writes=pair.center_writes)
            search = Search(pair, config, mesh=mesh)
            state = search.initial_state()
            for _ in range(iterations):
                state, _ = search.step(state)
            objective, act, xent = search.evaluate(fixed)
            mlp = next(w for name, w in params["blocks"][0].items() if name.endswith("_DxF"))  # w_in / w_down
            runs[f"{devices}x{model}"] = {
                "mesh": dict(search.mesh.shape),
                "mlp_width": mlp.shape[1], "mlp_devices": len(mlp.sharding.device_set),
                "mlp_shards": sorted({tuple(s.data.shape) for s in mlp.addressable_shards}),
                "sae_shards": sorted({tuple(s.data.shape) for s in sae.W_enc_DxS.addressable_shards}),
                "logits": np.asarray(logits).tolist(),
                "acts": {h: np.asarray(a, np.float32).tolist() for h, a in acts.items()},
                "tokens": state.tokens_KxN.tolist(), "objective": state.objective_K.tolist(),
                "act": state.act_K.tolist(), "xent": state.xent_K.tolist(),
                "fixed": [np.asarray(v).tolist() for v in (objective, act, xent)],
            }
    if "configured" in configs:  # a config's [model] model_parallel: the loaded pair's own mesh, and score
        pair = load_model_with_sae(load_config(configs["configured"]))
        scored = score_text(pair, TEXT, 0)
        out["configured"] = {"mesh": dict(pair.mesh.shape), "activations": scored["activations"],
                             "xent": scored["xent"][1:]}
    print(json.dumps(out))
""")


def _run(devices: int, configs: dict, meshes: list) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    args = [json.dumps(a) for a in (configs, meshes, HOOKS, ITERATIONS, SEARCH)]
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gemma2")
    assert write_tiny([str(folder), "--family", "gemma2"]) == 0
    return folder


@pytest.fixture(scope="module")
def configs(tiny_dir, gemma2_dir) -> dict:
    return {"gpt2": str(tiny_dir / "config.toml"), "gemma2": str(gemma2_dir / "config.toml")}


@pytest.fixture(scope="module")
def on_four(configs, tiny_dir) -> dict:
    """On 4 devices: one device alone (the reference), data 2 x model 2, data 1 x model 4; and the tiny
    GPT-2 loaded with `[model] model_parallel = 2`."""
    text = (tiny_dir / "config.toml").read_text().replace("[model]\n", "[model]\nmodel_parallel = 2\n")
    (tiny_dir / "config-model-parallel.toml").write_text(text)
    return _run(4, {**configs, "configured": str(tiny_dir / "config-model-parallel.toml")},
                [[1, 1], [4, 2], [4, 4]])


def _assert_same_as_one_device(run: dict, one: dict, model: int) -> None:
    assert run["mesh"]["model"] == model
    # really split: each device holds 1/model of the MLP's hidden units, and of the SAE's latents
    assert run["mlp_devices"] == run["mesh"]["data"] * model
    assert run["mlp_shards"] == [[32, run["mlp_width"] // model]]  # d_model 32 whole, the hidden units split
    assert [s[1] for s in run["sae_shards"]] == [64 // model]
    np.testing.assert_allclose(run["logits"], one["logits"], atol=1e-5, rtol=0)
    for hook, values in one["acts"].items():
        np.testing.assert_allclose(run["acts"][hook], values, atol=1e-5, rtol=0, err_msg=hook)
    for name in ("objective", "act", "xent"):
        np.testing.assert_allclose(run[name], one[name], atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(run["fixed"], one["fixed"], atol=1e-5, rtol=0)
    assert run["tokens"] == one["tokens"]  # the same elites


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_four_devices_split_the_weights_and_agree_with_one(on_four, family):
    runs = on_four[family]
    one = runs["1x1"]
    assert on_four["devices"] == 4 and one["mesh"] == {"data": 1, "model": 1}
    assert one["mlp_shards"] == [[32, one["mlp_width"]]]
    assert runs["4x2"]["mesh"] == {"data": 2, "model": 2} and runs["4x4"]["mesh"] == {"data": 1, "model": 4}
    for key, model in (("4x2", 2), ("4x4", 4)):
        _assert_same_as_one_device(runs[key], one, model)


@pytest.mark.slow
def test_eight_devices_agree_with_one(configs, on_four):
    eight = _run(8, configs, [[8, 2], [8, 4]])
    assert eight["devices"] == 8
    for family in configs:
        one = on_four[family]["1x1"]
        assert eight[family]["8x2"]["mesh"] == {"data": 4, "model": 2}
        assert eight[family]["8x4"]["mesh"] == {"data": 2, "model": 4}
        _assert_same_as_one_device(eight[family]["8x2"], one, 2)
        _assert_same_as_one_device(eight[family]["8x4"], one, 4)


@pytest.mark.slow
def test_a_configured_model_axis_reaches_score(on_four, tiny_pair):
    from epo_tui.engine.scoring import score_text

    configured = on_four["configured"]
    assert configured["mesh"] == {"data": 2, "model": 2}
    alone = score_text(tiny_pair, "The quick brown fox jumps over the lazy dog", 0)
    np.testing.assert_allclose(configured["activations"], alone["activations"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(configured["xent"], alone["xent"][1:], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_worker_searches_on_a_configured_model_axis(on_four, tiny_dir, tmp_path):
    """`epo-tui worker` on 4 devices with `[model] model_parallel = 2`: its ready event says so, and its
    search ends on the elites the same layout gives in-process."""
    from worker_process import WorkerProcess

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    w = WorkerProcess(tmp_path, env=env)
    try:
        w.expect("hello")
        w.send("load", id="l", config_path=str(tiny_dir / "config-model-parallel.toml"))
        ready = w.expect("ready", id="l", timeout=300)
        assert ready["model_parallel"] == 2 and len(ready["devices"]) == 4
        w.send("start", id="s", search={**SEARCH, "iterations": ITERATIONS}, checkpoint_seconds=0)
        finished = w.expect("finished", timeout=300)
    finally:
        w.close()
    result = json.loads((Path(finished["folder"]) / "result.json").read_text())
    N = len(on_four["gpt2"]["4x2"]["tokens"][0])
    assert [e["token_ids"][-N:] for e in result["elites"]] == on_four["gpt2"]["4x2"]["tokens"]

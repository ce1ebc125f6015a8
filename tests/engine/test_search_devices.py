"""The search gives the same result on 1 device and on 4 (simulated CPU) devices, and really shards
the evaluation over all 4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# K*C = 3*7 = 21 children: not a multiple of 4, so the evaluation pads
SCRIPT = textwrap.dedent("""
    import json, sys
    from dataclasses import replace

    import jax
    import numpy as np

    from epo_tui.config import load_config
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.search import Search

    config = load_config(sys.argv[1])
    config = replace(config, search=replace(config.search, elites=3, candidates=7, seed=3))
    search = Search(load_model_with_sae(config), config)
    inputs = []
    split = search.scorer._split

    def spy(array):
        placed = split(array)
        if placed.ndim == 2:
            inputs.append(placed)  # a call's prompts, as placed on the mesh
        return placed

    search.scorer._split = spy
    state = search.initial_state()
    for _ in range(10):
        state, _ = search.step(state)
    children = inputs[-1]
    print(json.dumps({
        "local_devices": jax.local_device_count(),
        "mesh_devices": int(search.mesh.size),
        "children_devices": len(children.sharding.device_set),
        "children_shards": sorted(tuple(s.data.shape) for s in children.addressable_shards),
        "children_shape": list(children.shape),
        "tokens": state.tokens_KxN.tolist(),
        "act": state.act_K.tolist(),
        "xent": state.xent_K.tolist(),
        "objective": state.objective_K.tolist(),
        "frontier_tokens": state.frontier.tokens.tolist(),
    }))
""")


def _run(config_path, devices: int | None) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(config_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_device_and_four_devices_agree(tiny_dir):
    one = _run(tiny_dir / "config.toml", None)
    four = _run(tiny_dir / "config.toml", 4)

    assert one["local_devices"] == 1 and one["mesh_devices"] == 1 and one["children_devices"] == 1
    assert four["local_devices"] == 4 and four["mesh_devices"] == 4
    assert four["children_devices"] == 4  # the evaluation's input spans all four
    # 21 children go in calls of 8 per device (the smallest call), padded; 32 on four devices
    assert four["children_shape"] == [32, 6] and four["children_shards"] == [[8, 6]] * 4
    assert one["children_shape"] == [8, 6]

    assert four["tokens"] == one["tokens"]
    assert four["frontier_tokens"] == one["frontier_tokens"]
    for name in ("act", "xent", "objective"):
        np.testing.assert_allclose(four[name], one[name], atol=1e-5, rtol=0)

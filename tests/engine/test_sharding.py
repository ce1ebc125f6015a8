"""Which axis of each parameter the model axis splits, and whether a model fits the devices' memory:
pure functions over names, shapes and (fake) memory figures. Runs on any device count; the runs on 4
and 8 simulated devices are in test_model_parallel.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import ShapeDtypeStruct
from jax.sharding import PartitionSpec as P

from epo_tui.config import parse_config
from epo_tui.engine import sharding
from epo_tui.engine.tiny import FAMILIES
from epo_tui.errors import ConfigError, UserError

M = "model"


@pytest.mark.parametrize("name, shape, model_size, spec", [
    ("w_q_HxKxD", (8, 4, 32), 2, P(M)),
    ("w_k_GxKxD", (2, 4, 32), 2, P(M)),
    ("w_k_GxKxD", (2, 4, 32), 4, P()),  # 2 key-value heads on 4 devices: each device holds both
    ("w_o_DxHxK", (32, 8, 4), 4, P(None, M)),
    ("w_gate_FxD", (64, 32), 4, P(M)),
    ("w_down_DxF", (32, 64), 4, P(None, M)),
    ("embed_VxD", (320, 32), 4, P(M)),
    ("wte_VxD", (50257, 768), 2, P()),  # GPT-2's vocabulary is odd: kept whole
    ("wpe_PxD", (1024, 768), 2, P()),
    ("w_qkv_Dx3xHxK", (32, 3, 4, 8), 2, P(None, None, M)),
    ("w_o_HxKxD", (4, 8, 32), 2, P(M)),
    ("b_qkv", (96,), 2, P()),  # no shape suffix: whole
    ("ln1_g", (32,), 2, P()),
    ("q_norm_K", (8,), 2, P()),
    ("b_in_F", (64,), 2, P(M)),
    ("W_enc_DxS", (32, 64), 4, P(None, M)),  # the SAE, along its latents
    ("W_dec_SxD", (64, 32), 4, P(M)),
    ("b_dec_D", (32,), 4, P()),
    ("w_gate_ExFxD", (8, 64, 32), 4, P(M)),  # experts first ...
    ("w_gate_ExFxD", (6, 64, 32), 4, P(None, M)),  # ... or the MLP width when the experts do not divide
    ("w_q_HxKxD", (8, 4, 32), 1, P()),
    ("w_q_HxK", (8, 4, 32), 2, P()),  # a suffix that does not match the array's rank is no suffix
])
def test_a_parameters_name_says_which_axis_is_split(name, shape, model_size, spec):
    assert sharding.partition_spec(name, shape, model_size) == spec


@pytest.mark.parametrize("family", FAMILIES)
def test_every_head_and_mlp_weight_of_each_family_is_split(family, tmp_path):
    """The name rule alone splits every family's attention and MLP weights (experts too) on a model axis of 2."""
    from epo_tui.config import ModelConfig
    from epo_tui.engine.language_model import load_model
    from epo_tui.engine.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / family, family)
    params = load_model(ModelConfig(name=None, path=str(folder))).params
    sizes = sharding.letter_sizes(params)
    assert sizes["H"] % 2 == 0 and sizes["F"] % 2 == 0
    specs = sharding.leaf_specs(params, 2)
    for block, block_specs in zip(params["blocks"], specs["blocks"]):
        for name, leaf in block.items():
            letters = sharding.shape_letters(name, leaf.ndim)
            if letters is None:
                assert block_specs[name] == P(), name
            elif "H" in letters or "F" in letters:
                assert block_specs[name] != P(), name
    weights = sharding.weights_of(params, 2)
    assert weights.split > weights.whole  # norms, biases, positions (and an odd vocabulary) stay whole


# ----------------------------------------------------------------------------------------------
# Fitting the devices: Gemma 3's shapes as ShapeDtypeStructs (no memory used)

GB = 10**9


def gemma3_shapes(layers: int, D: int, F: int, H: int, G: int, K: int, V: int = 262208, dtype=jnp.bfloat16):
    """The parameter pytree of a Gemma 3 language model as the family names it, shapes only."""
    def s(*shape):
        return ShapeDtypeStruct(shape, dtype)

    block = {"ln_attn_w": s(D), "w_q_HxKxD": s(H, K, D), "w_k_GxKxD": s(G, K, D), "w_v_GxKxD": s(G, K, D),
             "w_o_DxHxK": s(D, H, K), "q_norm_K": s(K), "k_norm_K": s(K), "ln_attn_post_w": s(D),
             "ln_mlp_w": s(D), "w_gate_FxD": s(F, D), "w_up_FxD": s(F, D), "w_down_DxF": s(D, F),
             "ln_mlp_post_w": s(D)}
    return {"embed_VxD": s(V, D), "lnf_w": s(D), "blocks": [block] * layers}


GEMMA3_27B = gemma3_shapes(62, 5376, 21504, 32, 16, 128)
GEMMA3_12B = gemma3_shapes(48, 3840, 15360, 16, 8, 256)
V5E, V4 = 16 * GB, 32 * GB


def test_weight_bytes_split_over_the_model_axis():
    whole = sharding.weights_of(GEMMA3_27B, 1)
    assert whole.total == whole.whole and round(whole.total / GB, 1) == 54.0
    four = sharding.weights_of(GEMMA3_27B, 4)
    assert four.total == whole.total
    assert four.whole < 0.001 * four.total  # only norms stay whole
    assert four.per_device(4) == four.whole + -(-four.split // 4)


@pytest.mark.parametrize("tree, memory, devices, expected", [
    (GEMMA3_27B, V5E, 8, 8),  # 6.8 GB each: fits 80% of 16 GB; at 4 devices (13.5 GB) it would not
    (GEMMA3_27B, V4, 4, 4),
    (GEMMA3_27B, V4, 8, 4),  # the fewest that fit; the other 2 split the candidates
    (GEMMA3_12B, V5E, 4, 2),
    (GEMMA3_12B, 80 * GB, 8, 1),
    (GEMMA3_27B, None, 8, 1),  # memory unknown (CPU): the model is not split
])
def test_auto_picks_the_fewest_devices_that_hold_the_weights(tree, memory, devices, expected):
    assert sharding.choose_model_parallel(tree, "auto", what="m", n_devices=devices, memory=memory) == expected


def test_a_model_too_big_for_the_host_says_what_it_needs():
    with pytest.raises(UserError) as info:
        sharding.choose_model_parallel(GEMMA3_27B, "auto", what="google/gemma-3-27b-pt in bfloat16", n_devices=1,
                                       memory=V5E)
    assert str(info.value) == ("google/gemma-3-27b-pt in bfloat16 needs 54 GB: at least 8 devices of 16 GB with "
                               "[model] model_parallel = 8 (this host has 1 of 16 GB)")
    with pytest.raises(UserError) as info:
        sharding.choose_model_parallel(GEMMA3_27B, "auto", what="27b", n_devices=4, memory=V4 // 2)
    assert str(info.value) == ("27b needs 54 GB: at least 8 devices of 16 GB with [model] model_parallel = 8 "
                               "(this host has 4 of 16 GB)")
    with pytest.raises(UserError) as info:  # set by hand, too small
        sharding.choose_model_parallel(GEMMA3_27B, 2, what="27b", n_devices=4, memory=V4)
    assert str(info.value) == ("27b needs 54 GB: at least 4 devices of 32 GB with [model] model_parallel = 4 "
                               "(model_parallel = 2 puts 27 GB on each; this host has 4 of 32 GB)")
    f32 = jax.tree.map(lambda s: ShapeDtypeStruct(s.shape, jnp.float32), GEMMA3_27B)
    with pytest.raises(UserError) as info:  # not even one head per device fits
        sharding.choose_model_parallel(f32, "auto", what="27b in float32", n_devices=8, memory=2 * GB)
    assert str(info.value) == ('27b in float32 needs 108 GB: it fits devices of 2 GB at no [model] model_parallel '
                               '(this host has 8 of 2 GB); use model.dtype = "bfloat16" or bigger devices')


def test_a_model_parallel_setting_that_cannot_be_is_a_config_error():
    tiny = {"w_q_HxKxD": ShapeDtypeStruct((4, 8, 32), jnp.float32),
            "w_up_FxD": ShapeDtypeStruct((96, 32), jnp.float32)}
    assert sharding.choose_model_parallel(tiny, 2, what="t", n_devices=4, memory=None) == 2
    with pytest.raises(ConfigError) as info:
        sharding.choose_model_parallel(tiny, 3, what="t", n_devices=4, memory=None, source="c.toml")
    assert str(info.value) == ("c.toml: model.model_parallel: 3 does not divide this host's 4 devices "
                               '(choose 1, 2, 4 or "auto")')
    with pytest.raises(ConfigError) as info:
        sharding.choose_model_parallel(tiny, 8, what="t", n_devices=8, memory=None, source="c.toml")
    assert str(info.value) == "c.toml: model.model_parallel: 8 does not divide the model's 4 attention heads"
    tiny = {"w_q_HxKxD": ShapeDtypeStruct((16, 8, 32), jnp.float32),
            "w_up_FxD": ShapeDtypeStruct((100, 32), jnp.float32)}
    with pytest.raises(ConfigError) as info:
        sharding.choose_model_parallel(tiny, 8, what="t", n_devices=8, memory=None, source="c.toml")
    assert str(info.value) == "c.toml: model.model_parallel: 8 does not divide the model's 100 MLP width"


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def test_device_memory_is_the_smallest_limit_or_unknown():
    assert sharding.device_memory([FakeDevice({"bytes_limit": 3 * GB}), FakeDevice({"bytes_limit": 2 * GB})]) == 2 * GB
    assert sharding.device_memory([FakeDevice({"bytes_limit": 3 * GB}), FakeDevice(None)]) is None
    assert sharding.device_memory([FakeDevice(NotImplementedError("no stats"))]) is None
    assert sharding.device_memory([FakeDevice({"bytes_in_use": 5})]) is None
    assert sharding.device_memory(jax.local_devices()) is None  # CPU says nothing


def test_loading_a_model_the_devices_cannot_hold_fails_in_one_line(tiny_dir, tiny_pair, monkeypatch):
    from cli_run import run_cli

    memory = 100_000  # devices of 100 kB: the tiny GPT-2 (about 150 kB in float32) needs several
    on_mesh = (jax.tree.map(lambda a: ShapeDtypeStruct(a.shape, a.dtype), tiny_pair.model.params), tiny_pair.sae)
    need = sharding.devices_needed(on_mesh, memory)
    assert need is not None and need > 1
    monkeypatch.setattr(sharding, "device_memory", lambda devices=None: memory)
    code, out, err = run_cli("score", "--config", tiny_dir / "config.toml", "The quick brown fox")
    assert code == 2 and out == ""
    n = jax.local_device_count()
    total = sharding.size_text(sharding.weights_of(on_mesh, 1).total)
    assert total.endswith(" kB")
    assert err == (f"epo-tui: error: {tiny_dir / 'model'} in float32 with its SAE needs {total}: at least {need} "
                   f"devices of 100 kB with [model] model_parallel = {need} (this host has {n} of 100 kB)\n")


@pytest.mark.parametrize("value, message", [
    ("0", 'must be >= 1 or "auto", found 0'),
    ('"two"', "expected an integer >= 1 or \"auto\", found 'two' (string)"),
    ("true", 'expected an integer >= 1 or "auto", found True (boolean)'),
    ("2.0", 'expected an integer >= 1 or "auto", found 2.0 (number)'),
])
def test_model_parallel_in_the_config(value, message):
    assert parse_config("[model]\n").model.model_parallel == "auto"
    assert parse_config("[model]\nmodel_parallel = 4\n").model.model_parallel == 4
    with pytest.raises(ConfigError) as info:
        parse_config(f"[model]\nmodel_parallel = {value}\n", source="c.toml")
    assert str(info.value) == f"c.toml: model.model_parallel: {message}"


def test_a_mesh_has_a_data_and_a_model_axis():
    mesh = sharding.make_mesh(1)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": jax.local_device_count(), "model": 1}
    with pytest.raises(UserError):
        sharding.make_mesh(jax.local_device_count() + 1)

"""Objectives: each target kind reads the right number off the forward pass; the combines and reads."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from epo_tui.config import FeatureConfig, load_config
from epo_tui.engine.objective import Target, TargetArrays, build_target, combine, per_position, read
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.sae import activations, pre_activations
from epo_tui.errors import UserError

TEXT = "Hello world, the quick brown fox"


@pytest.fixture(scope="module")
def pair(tiny_dir):
    return load_model_with_sae(load_config(str(tiny_dir / "config.toml")))


def _forward(pair, target: Target):
    ids = np.array([pair.model.encode(TEXT)])
    hooks = () if target.kind == "logit" else (target.hook,)
    logits, acts = pair.model.forward(ids, hooks=hooks, center_writes=pair.center_writes)
    return logits, acts.get(target.hook)


def _values(pair, feature: FeatureConfig):
    target, arrays = build_target(pair, feature)
    logits, hook = _forward(pair, target)
    optimized, reported = per_position(target, arrays, pair.sae, hook, logits)
    return np.asarray(optimized[0]), np.asarray(reported[0]), np.asarray(logits[0]), None if hook is None else np.asarray(hook[0])


def test_sae_target_optimizes_the_pre_activation_and_reports_the_activation(pair):
    optimized, reported, _, hook = _values(pair, FeatureConfig(index=3, indices=(3, 7)))
    np.testing.assert_allclose(optimized, np.asarray(pre_activations(pair.sae, hook))[:, [3, 7]], atol=1e-5)
    np.testing.assert_allclose(reported, np.asarray(activations(pair.sae, hook))[:, [3, 7]], atol=1e-5)
    assert (optimized < 0).any() and (reported >= 0).all()  # the pre-activation has a signal below 0


def test_direction_target_is_the_residual_on_the_unit_decoder_row(pair):
    optimized, reported, _, hook = _values(pair, FeatureConfig(index=5, kind="direction"))
    row = np.asarray(pair.sae.W_dec_SxD)[5]
    np.testing.assert_allclose(optimized[:, 0], hook @ (row / np.linalg.norm(row)), atol=1e-5)
    np.testing.assert_array_equal(optimized, reported)


def test_neuron_target_reads_the_mlp_hook(pair):
    feature = FeatureConfig(index=11, kind="neuron", hook="blocks.0.mlp.hook_post")
    optimized, _, _, hook = _values(pair, feature)
    np.testing.assert_allclose(optimized[:, 0], hook[:, 11], atol=1e-6)


def test_logit_target_reads_the_token_logit(pair):
    optimized, _, logits, _ = _values(pair, FeatureConfig(index=42, kind="logit"))
    np.testing.assert_allclose(optimized[:, 0], logits[:, 42], atol=1e-6)


def test_vector_target_reads_a_user_vector(pair, tmp_path):
    vector = np.random.default_rng(0).normal(size=32).astype(np.float32)
    np.save(tmp_path / "v.npy", vector)
    feature = FeatureConfig(kind="vector", hook="blocks.1.hook_resid_post", vector=str(tmp_path / "v.npy"))
    optimized, _, _, hook = _values(pair, feature)
    np.testing.assert_allclose(optimized[:, 0], hook @ vector, atol=1e-5)


@pytest.mark.parametrize("feature, message", [
    (FeatureConfig(index=64), "feature.index: 64 is out of range for this SAE (0..63)"),
    (FeatureConfig(index=128, kind="neuron", hook="blocks.0.mlp.hook_post"),
     "128 is out of range for a neuron target (0..127)"),
    (FeatureConfig(index=10_000, kind="logit"), "out of range for a logit target"),
    (FeatureConfig(index=1, kind="neuron", hook="blocks.9.mlp.hook_post"), "is not in the model"),
])
def test_targets_out_of_range_are_clear_errors(pair, feature, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_target(pair, feature)


def test_a_vector_of_the_wrong_width_or_a_pickle_is_refused(pair, tmp_path):
    np.save(tmp_path / "short.npy", np.zeros(7, np.float32))
    with pytest.raises(UserError, match=r"has shape \(1, 7\); expected \(32,\)"):
        build_target(pair, FeatureConfig(kind="vector", hook="blocks.1.hook_resid_pre", vector=str(tmp_path / "short.npy")))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="cannot read"):
        build_target(pair, FeatureConfig(kind="vector", hook="blocks.1.hook_resid_pre", vector=str(tmp_path / "obj.npy")))


def _target(n: int, combine_name: str = "lp", read_name: str = "last") -> Target:
    return Target(kind="sae", combine=combine_name, lp_p=0.1, lp_offset=4.0, read=read_name, hook="h", n_features=n)


def test_combines():
    values = jnp.asarray([[[1.0, 3.0], [2.0, 2.0], [-5.0, 6.0]]])  # 1 x 3 positions x 2 features
    np.testing.assert_allclose(combine(_target(2, "sum"), values)[0], [4.0, 4.0, 1.0])
    np.testing.assert_allclose(combine(_target(2, "min"), values)[0], [1.0, 2.0, -5.0])
    np.testing.assert_allclose(combine(_target(2, "contrast"), values)[0], [-2.0, 0.0, -11.0])
    lp = np.asarray(combine(_target(2, "lp"), values)[0])
    expected = [(np.mean(np.maximum(np.array(v) + 4.0, 1e-6) ** 0.1)) ** 10 - 4.0
                for v in ([1.0, 3.0], [2.0, 2.0], [-5.0, 6.0])]
    np.testing.assert_allclose(lp, expected, rtol=1e-4)
    assert lp[1] == pytest.approx(2.0, abs=1e-4)  # equal activations give themselves
    assert lp[0] < 2.0 < 3.0  # p < 1: the weaker feature dominates, so both must rise
    single = jnp.asarray([[[1.5], [2.5]]])
    np.testing.assert_array_equal(combine(_target(1, "lp"), single)[0], [1.5, 2.5])


def test_lp_has_a_gradient_even_when_a_feature_is_far_below_zero():
    import jax

    grad = jax.grad(lambda v: combine(_target(2, "lp"), v).sum())(jnp.asarray([[[-10.0, 1.0]]]))
    assert np.isfinite(np.asarray(grad)).all()


def test_reads():
    values = jnp.asarray([[0.5, 3.0, 1.0], [2.0, -1.0, 0.0]])
    value, position = read(_target(1, read_name="last"), values)
    np.testing.assert_array_equal(value, [1.0, 0.0])
    np.testing.assert_array_equal(position, [2, 2])
    value, position = read(_target(1, read_name="max"), values)
    np.testing.assert_array_equal(value, [3.0, 2.0])
    np.testing.assert_array_equal(position, [1, 0])


def test_changing_the_feature_changes_only_arrays(pair):
    a_target, a_arrays = build_target(pair, FeatureConfig(index=3))
    b_target, b_arrays = build_target(pair, dataclasses.replace(FeatureConfig(index=9)))
    assert a_target == b_target and hash(a_target) == hash(b_target)
    assert isinstance(b_arrays, TargetArrays) and int(b_arrays.indices_F[0]) == 9

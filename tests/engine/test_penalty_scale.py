"""search.penalty_scale: λ priced in the feature's dataset maximum (or a measured scale), so the same λ
means the same on SAEs of very different scale (engine/penalty_scale.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from epo_tui import dataset_stats, paths
from epo_tui.config import SAEConfig, load_config
from epo_tui.engine import penalty_scale
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.penalty_scale import DATASET_MAXIMUM, MEASURED, NONE, ObjectiveScale
from epo_tui.engine.sae import pre_activations
from epo_tui.engine.search import Search

LATENT = 524  # the demo's "Debian" latent


def test_measured_is_three_standard_deviations_and_a_flat_target_keeps_raw_units():
    values = np.array([[1.0, -1.0], [3.0, -3.0]])
    assert penalty_scale.measured(values) == ObjectiveScale(3 * float(values.std()), MEASURED)
    assert penalty_scale.measured(np.full(5, 2.0)) == ObjectiveScale(1.0, NONE)
    assert penalty_scale.measured(np.array([1.0, np.nan])) == ObjectiveScale(1.0, NONE)
    for unknown in (None, 0.0, -1.0, float("nan"), float("inf")):
        assert penalty_scale.from_dataset(unknown) is None
    assert penalty_scale.from_dataset(7.5) == ObjectiveScale(7.5, DATASET_MAXIMUM)


def test_several_features_share_one_source_or_none():
    a, b = ObjectiveScale(2.0, DATASET_MAXIMUM), ObjectiveScale(8.0, DATASET_MAXIMUM)
    assert penalty_scale.per_feature([a, b]) == ObjectiveScale(1.0, DATASET_MAXIMUM, (2.0, 8.0))
    assert penalty_scale.per_feature([a, None]) is None
    assert penalty_scale.per_feature([a, ObjectiveScale(3.0, MEASURED)]) is None
    assert penalty_scale.per_feature([ObjectiveScale(1.0, NONE)] * 2) is None
    assert ObjectiveScale(1.0, DATASET_MAXIMUM, (2.0, 8.0)).describe() == (
        "λ = 1 prices a nat at a tenth of each feature's dataset maximum (2, 8), each feature divided by its own")


def test_xent_weights_price_a_nat_at_a_tenth_of_the_scale():
    lambdas = np.array([1.0, 2.0, 20.0], np.float32)
    np.testing.assert_allclose(ObjectiveScale(7.5, DATASET_MAXIMUM).xent_weights(lambdas), [0.75, 1.5, 15.0], rtol=1e-6)
    np.testing.assert_array_equal(ObjectiveScale(1.0, NONE).xent_weights(lambdas), lambdas)
    assert ObjectiveScale(7.5, DATASET_MAXIMUM).describe() == (
        "λ = 1 prices a nat at 0.75 (a tenth of the dataset maximum, 7.5)")


def test_result_json_records_the_scale_and_what_a_nat_costs_at_lambda_1():
    assert ObjectiveScale(7.5, DATASET_MAXIMUM).to_json() == {
        "source": "dataset maximum", "value": 7.5, "features": [], "nat_at_lambda_1": 0.75,
        "description": "λ = 1 prices a nat at 0.75 (a tenth of the dataset maximum, 7.5)"}
    several = ObjectiveScale(1.0, MEASURED, (2.0, 8.0)).to_json()
    assert (several["features"], several["nat_at_lambda_1"]) == ([2.0, 8.0], 0.1)  # each latent in its own scale
    assert ObjectiveScale(1.0, NONE).to_json()["nat_at_lambda_1"] == 1.0  # raw units: λ itself
    for scale in (ObjectiveScale(7.5, DATASET_MAXIMUM), ObjectiveScale(1.0, MEASURED, (2.0, 8.0)), ObjectiveScale(1.0, NONE)):
        assert scale.xent_weights(np.ones(1)) == np.float32(scale.to_json()["nat_at_lambda_1"])


@pytest.fixture(scope="module")
def demo_config():
    config = load_config(str(paths.demo_pack() / "config.toml"))
    search = dataclasses.replace(config.search, elites=4, candidates=24, time_budget="")
    return dataclasses.replace(config, search=search, feature=dataclasses.replace(config.feature, index=LATENT))


def scaled_sae_copy(folder: Path, factor: float) -> Path:
    """The demo SAE with every activation multiplied by `factor` and the same reconstruction: a standard
    SAE's encoder and encoder bias times factor, its decoder divided by it."""
    source = paths.demo_pack() / "sae"
    folder.mkdir(parents=True)
    for name in ("cfg.json", "sparsity.safetensors"):
        shutil.copy(source / name, folder / name)
    assert json.loads((source / "cfg.json").read_text())["architecture"] == "standard"
    weights = load_file(source / "sae_weights.safetensors")
    weights["W_enc"] = weights["W_enc"] * np.float32(factor)
    weights["b_enc"] = weights["b_enc"] * np.float32(factor)
    weights["W_dec"] = weights["W_dec"] / np.float32(factor)
    save_file(weights, folder / "sae_weights.safetensors")
    return folder


def search_with_sae(config, sae_dir: Path, **search) -> Search:
    config = dataclasses.replace(config, sae=SAEConfig(release=None, id=None, path=str(sae_dir)),
                                 search=dataclasses.replace(config.search, **search))
    return Search(load_model_with_sae(config), config)


def test_the_demo_latent_is_priced_in_its_shipped_dataset_maximum(demo_config):
    search = Search(load_model_with_sae(demo_config), demo_config)
    stats = dataset_stats.load_best_stats(dataset_stats.sae_key(search.pair.model.name, search.pair.sae.display_name))
    assert search.objective_scale == ObjectiveScale(stats.max(LATENT), DATASET_MAXIMUM)
    np.testing.assert_allclose(search.xent_weights_K, search.lambdas_K * stats.max(LATENT) / 10, rtol=1e-6)
    measured = Search(search.pair, dataclasses.replace(demo_config, search=dataclasses.replace(
        demo_config.search, penalty_scale="measured")))
    assert measured.objective_scale.source == MEASURED
    # the measured scale stands in for the maximum: on the demo the two are of one size
    assert 0.4 < measured.objective_scale.value / stats.max(LATENT) < 2.5


@pytest.mark.slow
def test_an_sae_fifty_times_larger_gets_the_same_search(demo_config, tmp_path):
    """Neither copy has dataset statistics, so both measure their scale; the ×50 copy's is 50 times as
    large, and the two searches choose the very same prompts, their activations 50 times apart."""
    small = search_with_sae(demo_config, scaled_sae_copy(tmp_path / "x1", 1.0))
    large = search_with_sae(demo_config, scaled_sae_copy(tmp_path / "x50", 50.0))
    assert small.objective_scale.source == large.objective_scale.source == MEASURED
    assert large.objective_scale.value / small.objective_scale.value == pytest.approx(50, rel=1e-5)
    raw = search_with_sae(demo_config, tmp_path / "x50", penalty_scale="none")
    states = [s.initial_state() for s in (small, large, raw)]
    for _ in range(8):
        states = [s.step(state)[0] for s, state in zip((small, large, raw), states)]
    small_state, large_state, raw_state = states
    np.testing.assert_array_equal(small_state.tokens_KxN, large_state.tokens_KxN)
    np.testing.assert_allclose(large_state.act_K, 50 * small_state.act_K, rtol=1e-4, atol=1e-4)
    # without the scale, λ means 50 times less on the large copy: the search goes elsewhere
    assert not np.array_equal(raw_state.tokens_KxN, large_state.tokens_KxN)


def test_dataset_statistics_of_the_copy_price_it_in_its_own_maximum(demo_config, tmp_path):
    folder = scaled_sae_copy(tmp_path / "x50", 50.0)
    probe = search_with_sae(demo_config, folder, penalty_scale="none")
    key = dataset_stats.sae_key(probe.pair.model.name, probe.pair.sae.display_name)
    maxima = np.full(probe.pair.sae.d_sae, np.nan)
    maxima[LATENT] = 375.5
    dataset_stats.write_stats(dataset_stats.stats_folder(key, dataset_stats.LOCAL), maxima,
                              np.full_like(maxima, np.nan), [])
    try:
        search = Search(probe.pair, dataclasses.replace(probe.config, search=dataclasses.replace(
            probe.config.search, penalty_scale="auto")))
        assert search.objective_scale == ObjectiveScale(375.5, DATASET_MAXIMUM)
    finally:
        shutil.rmtree(dataset_stats.stats_folder(key, dataset_stats.LOCAL))


def test_two_latents_are_each_divided_by_their_own_dataset_maximum(demo_config):
    latents = (LATENT, 48)
    config = dataclasses.replace(demo_config, feature=dataclasses.replace(
        demo_config.feature, index=latents[0], indices=latents, combine="lp", lp_p=0.5, lp_offset=1.0))
    pair = load_model_with_sae(config)
    search = Search(pair, config)
    stats = dataset_stats.load_best_stats(dataset_stats.sae_key(pair.model.name, pair.sae.display_name))
    maxima = np.array([stats.max(i) for i in latents])
    assert search.objective_scale == ObjectiveScale(1.0, DATASET_MAXIMUM, tuple(maxima))
    np.testing.assert_allclose(search.xent_weights_K, search.lambdas_K / 10, rtol=1e-6)
    state = search.initial_state()
    prefix = np.asarray(search.prefix_ids)
    full = np.concatenate([np.repeat(prefix[None], len(state.tokens_KxN), 0), state.tokens_KxN], axis=1)
    _, sae_in = pair.forward(jnp.asarray(full), logits=False)
    shares_KxF = np.asarray(pre_activations(pair.sae, sae_in))[:, -1, list(latents)] / maxima  # read: last
    expected = (np.maximum(np.maximum(shares_KxF + 1.0, 0), 1e-6) ** 0.5).mean(-1) ** 2 - 1.0
    np.testing.assert_allclose(state.objective_K, expected, atol=1e-4)

"""The demo SAE trainer on a tiny random GPT-2: the written folder loads through the engine and sae-lens
with identical activations, the centring convention matches the search's pairing, and the reported
FVE / L0 / alive fraction agree with an independent numpy computation."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

HOOK = "blocks.1.hook_resid_pre"
WORDS = ("the quick brown fox jumps over lazy dog hello world this is a tiny model cannabis law "
         "officials refused to comment animals shelter need homes left right up down hot cold").split()


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 40))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from epo_tui.config import ModelConfig
    from epo_tui.demo.train_sae import SAESpec, collect, sae_metrics, save_sae, train_sae
    from epo_tui.engine.language_model import load_model
    from epo_tui.engine.tiny import write_tiny_checkpoint

    out = tmp_path_factory.mktemp("demo_sae")
    write_tiny_checkpoint(out / "model")
    (out / "corpus").mkdir()
    with open(out / "corpus" / "heldout.jsonl", "w") as f:
        for i, text in enumerate(_texts(20, seed=1)):
            f.write(json.dumps({"name": f"doc{i}", "text": text}) + "\n")
    lm = load_model(ModelConfig(name=None, path=str(out / "model")))
    train_acts = collect(lm, _texts(300, seed=0), HOOK, max_tokens=6000)
    spec = replace(SAESpec(), hook_name=HOOK, d_sae=64, steps=300, batch=256, lr=3e-3,
                   l1_coefficient=0.5, dead_window=50, resample_at=(0.3,))
    result = train_sae(train_acts, spec, log=lambda *_: None)
    train_m = sae_metrics(result, train_acts)
    save_sae(out / "sae", result, spec, train_m["firing_rate"], model_name="tiny")
    return out, lm, result, train_acts, train_m


def test_folder_loads_in_engine_and_sae_lens_with_identical_activations(built, tmp_path):
    import jax.numpy as jnp
    import torch
    from sae_lens import SAE

    from epo_tui.config import SAEConfig
    from epo_tui.engine.sae import activations
    from epo_tui.engine.sae_loading import load_sae

    out, _, result, acts, _ = built
    ours = load_sae(SAEConfig(path=str(out / "sae")), cache_root=tmp_path)
    assert (ours.architecture, ours.hook_name, ours.d_in, ours.d_sae) == ("standard", HOOK, 32, 64)
    assert ours.center_writes is True and ours.model_class_name in (None, "HookedTransformer")
    theirs = SAE.load_from_disk(out / "sae", device="cpu", dtype="float32")
    x = acts[:500]
    with torch.no_grad():
        f_theirs = theirs.encode(torch.from_numpy(x)).numpy()
        x_hat_theirs = theirs.decode(torch.from_numpy(f_theirs)).numpy()
    f_ours = np.asarray(activations(ours, jnp.asarray(x)))
    np.testing.assert_allclose(f_ours, f_theirs, atol=1e-5, rtol=1e-5)
    assert (f_ours > 0).any()
    # the saved (scale-folded) weights reconstruct raw activations
    np.testing.assert_allclose(x_hat_theirs, f_theirs @ result.W_dec_SxD + result.b_dec_D, atol=1e-4)
    from safetensors.numpy import load_file

    sparsity = load_file(str(out / "sae" / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (64,) and sparsity.max() <= 0


def test_metrics_match_independent_numpy(built):
    from epo_tui.demo.train_sae import load_saved_arrays, sae_metrics

    out, _, _, acts, train_m = built
    w = {k: v.astype(np.float64) for k, v in load_saved_arrays(out / "sae").items()}
    x = acts.astype(np.float64)
    f = np.maximum((x - w["b_dec_D"]) @ w["W_enc_DxS"] + w["b_enc_S"], 0.0)
    x_hat = f @ w["W_dec_SxD"] + w["b_dec_D"]
    fve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    l0 = (f > 0).sum(1).mean()
    alive = (f > 0).any(0).mean()
    assert train_m["fve"] == pytest.approx(fve, abs=2e-4)
    assert train_m["l0"] == pytest.approx(l0, abs=0.05)
    assert train_m["alive_fraction"] == pytest.approx(alive, abs=1 / 64 + 1e-9)
    np.testing.assert_allclose(train_m["firing_rate"], (f > 0).mean(0), atol=2e-3)
    # an odd-sized input exercises the padded last chunk
    odd = sae_metrics(w, acts[:1001], batch=256)
    assert odd["l0"] == pytest.approx((f[:1001] > 0).sum(1).mean(), abs=0.05)
    assert odd["alive_fraction"] == pytest.approx((f[:1001] > 0).any(0).mean(), abs=1e-9)
    # training did something: better than predicting the mean, and sparse
    assert fve > 0.3 and l0 < 40


def test_eval_sae_matches_the_search_pairing(built):
    from epo_tui.demo.train_sae import eval_sae

    out, *_ = built
    report = eval_sae(out, log=lambda *_: None)
    assert report["pairing_max_abs_diff"] < 1e-5  # the search sees what the SAE was trained on
    assert report["heldout_tokens"] > 100 and 0 < report["l0"] < 64


def test_resample_reinitialises_only_dead_latents(built):
    import jax.numpy as jnp

    from epo_tui.demo.train_sae import _resample

    _, _, result, acts, _ = built
    assert len(result.resampled) == 1  # the mid-training re-initialisation ran
    params = {"W_enc": jnp.asarray(result.W_enc_DxS), "b_enc": jnp.asarray(result.b_enc_S) + 1.0,
              "W_dec": jnp.asarray(result.W_dec_SxD), "b_dec": jnp.asarray(result.b_dec_D)}
    dead = np.array([3, 17])
    new = _resample(params, jnp.asarray(acts), dead, np.random.default_rng(0))
    keep = np.setdiff1d(np.arange(64), dead)
    for name in ("W_enc", "W_dec"):
        np.testing.assert_array_equal(np.asarray(new[name])[..., keep] if name == "W_enc"
                                      else np.asarray(new[name])[keep],
                                      np.asarray(params[name])[..., keep] if name == "W_enc"
                                      else np.asarray(params[name])[keep])
    assert np.all(np.asarray(new["b_enc"])[dead] == 0) and np.all(np.asarray(new["b_enc"])[keep] != 0)
    assert not np.allclose(np.asarray(new["W_dec"])[dead], np.asarray(params["W_dec"])[dead])


def test_saved_decoder_rows_are_unit_norm_and_the_fold_keeps_reconstructions():
    from epo_tui.demo.train_sae import unit_norm_decoder

    rng = np.random.default_rng(0)
    W_enc, b_enc, W_dec = rng.normal(size=(8, 5)), rng.normal(size=5), 3 * rng.normal(size=(5, 8))
    x = rng.normal(size=(50, 8))
    f = np.maximum(x @ W_enc + b_enc, 0)
    W_enc2, b_enc2, W_dec2 = unit_norm_decoder(W_enc, b_enc, W_dec)
    f2 = np.maximum(x @ W_enc2 + b_enc2, 0)
    np.testing.assert_allclose(np.linalg.norm(W_dec2, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(f2 @ W_dec2, f @ W_dec, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(f2 > 0, f > 0)
    np.testing.assert_allclose(f2, f * np.linalg.norm(W_dec, axis=1), rtol=1e-6, atol=1e-9)

"""SAE loading, caching and JAX encoding, checked against sae-lens itself on random SAEs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sae_lens import SAE

from epo_tui.config import SAEConfig
from epo_tui.engine import sae as sae_mod
from epo_tui.engine import sae_loading
from epo_tui.engine.sae import (SAEParams, activations, check_feature_index,
                                feature_pre_and_act, pre_activations)
from epo_tui.engine.sae_loading import load_sae
from epo_tui.engine.pairing import check_sae_fits
from epo_tui.engine.sae_writer import write_random_sae
from epo_tui.errors import ConfigError, UserError

D_IN, D_SAE, K = 32, 96, 8
HOOK = "blocks.1.hook_resid_pre"
REPO_ROOT = Path(__file__).resolve().parents[2]


def local(folder: Path) -> SAEConfig:
    return SAEConfig(release=None, id=None, path=str(folder))


def sae_lens_outputs(folder: Path, x_BxLxD: torch.Tensor) -> tuple[np.ndarray, np.ndarray, SAE]:
    """(acts, hidden_pre) as sae-lens computes them (hidden_pre from its hook_sae_acts_pre)."""
    sae = SAE.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        acts = sae.encode(x_BxLxD)
        _, cache = sae.run_with_cache(x_BxLxD, names_filter="hook_sae_acts_pre")
    return acts.numpy(), cache["hook_sae_acts_pre"].numpy(), sae


def random_input(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(seed))  # norm ~ sqrt(D_IN)


PARITY_CASES = [(arch, b_dec, "none") for arch in ("standard", "jumprelu", "topk") for b_dec in (True, False)]
PARITY_CASES += [(arch, True, norm) for arch in ("standard", "jumprelu", "topk")
                 for norm in ("constant_norm_rescale", "layer_norm")]
PARITY_CASES += [("jumprelu", False, "layer_norm")]


@pytest.mark.parametrize(("architecture", "apply_b_dec", "normalize"), PARITY_CASES)
def test_parity_with_sae_lens(tmp_path, architecture, apply_b_dec, normalize):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture=architecture, seed=3, k=K,
                              apply_b_dec_to_input=apply_b_dec, normalize_activations=normalize)
    params = load_sae(local(folder), cache_root=tmp_path / "cache")
    x = random_input()
    acts_ref, pre_ref, _ = sae_lens_outputs(folder, x)
    x_j = jnp.asarray(x.numpy())

    acts = np.asarray(jax.jit(activations)(params, x_j))
    pre = np.asarray(jax.jit(pre_activations)(params, x_j))
    np.testing.assert_allclose(acts, acts_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pre, pre_ref, atol=1e-5, rtol=0)

    # the random SAE really exercises the activation: some latents fire, most do not
    fired = (acts_ref > 0).mean()
    assert 0.05 < fired < 0.7
    if architecture == "jumprelu":  # some pre-activations sit between 0 and the threshold
        assert ((pre_ref > 0) & (acts_ref == 0)).any()
    if architecture == "topk":
        assert ((acts_ref > 0).sum(-1) <= K).all()

    selected = np.array([0, 5, D_SAE - 1, int(np.argmax(acts_ref[0, 0]))])
    pre_F, act_F = jax.jit(feature_pre_and_act)(params, x_j, jnp.asarray(selected))
    np.testing.assert_allclose(np.asarray(act_F), acts_ref[..., selected], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(pre_F), pre_ref[..., selected], atol=1e-5, rtol=0)
    one_pre, one_act = feature_pre_and_act(params, x_j, int(selected[-1]))
    assert one_act.shape == (3, 7)
    np.testing.assert_allclose(np.asarray(one_act), acts_ref[..., selected[-1]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(one_pre), pre_ref[..., selected[-1]], atol=1e-5, rtol=0)


def test_topk_decoder_norm_rescaling_is_folded(tmp_path):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture="topk", k=K, seed=4,
                              rescale_acts_by_decoder_norm=True)
    params = load_sae(local(folder), cache_root=tmp_path / "cache")
    x = random_input(1)
    acts_ref, pre_ref, sae = sae_lens_outputs(folder, x)
    x_j = jnp.asarray(x.numpy())
    np.testing.assert_allclose(np.asarray(activations(params, x_j)), acts_ref, atol=1e-5, rtol=0)
    # our pre-activations are the ones TopK ranks: hidden_pre times the decoder norms
    rescaled = pre_ref * sae.W_dec.norm(dim=-1).detach().numpy()
    np.testing.assert_allclose(np.asarray(pre_activations(params, x_j)), rescaled, atol=1e-5, rtol=0)


def test_static_fields(tmp_path):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture="jumprelu",
                              model_from_pretrained_kwargs={"center_writing_weights": False})
    params = load_sae(local(folder), cache_root=tmp_path / "cache")
    assert (params.architecture, params.hook_name, params.d_in, params.d_sae) == ("jumprelu", HOOK, D_IN, D_SAE)
    assert params.center_writes is False and params.path == str(folder) and params.dtype == "float32"
    assert float(params.threshold_S.min()) > 0
    plain = load_sae(local(write_random_sae(tmp_path / "plain", D_IN, D_SAE, HOOK)), cache_root=tmp_path / "cache")
    assert plain.center_writes is None and plain.k == 0 and float(jnp.abs(plain.threshold_S).max()) == 0
    assert jax.tree.leaves(plain)[0].shape == (D_IN, D_SAE)  # a pytree of its five arrays


def _cache_entry(cache_root: Path) -> Path:
    (entry,) = (cache_root / "saes").iterdir()
    return entry


def test_second_load_reads_only_the_cache(tmp_path):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture="topk", k=K)
    first = load_sae(local(folder), cache_root=tmp_path / "cache")
    entry = _cache_entry(tmp_path / "cache")
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "sae.safetensors"]
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from epo_tui.config import SAEConfig
        from epo_tui.engine.sae_loading import load_sae
        sae = load_sae(SAEConfig(release=None, id=None, path={str(folder)!r}),
                       cache_root={str(tmp_path / "cache")!r})
        np.save({str(tmp_path / "w.npy")!r}, np.asarray(sae.W_enc_DxS))
        print(sae.architecture, sae.k, "sae_lens" in sys.modules, "torch" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["topk", str(K), "False", "False"]
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), np.asarray(first.W_enc_DxS))


def test_changed_folder_invalidates_the_cache(tmp_path):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, seed=0)
    before = load_sae(local(folder), cache_root=tmp_path / "cache")
    weights = folder / "sae_weights.safetensors"
    old = weights.stat()
    write_random_sae(folder, D_IN, D_SAE, HOOK, seed=1)  # same shapes, so the same file size
    new = weights.stat()
    if new.st_mtime_ns == old.st_mtime_ns:  # coarse file-system clocks: make the rewrite visible
        os.utime(weights, ns=(new.st_atime_ns, old.st_mtime_ns + 1_000_000))
    after = load_sae(local(folder), cache_root=tmp_path / "cache")
    _, _, sae = sae_lens_outputs(folder, random_input())
    np.testing.assert_array_equal(np.asarray(after.W_enc_DxS), sae.W_enc.detach().numpy())
    assert not np.array_equal(np.asarray(after.W_enc_DxS), np.asarray(before.W_enc_DxS))


@pytest.mark.parametrize("damage", ["garbage_weights", "truncated_weights", "bad_meta", "missing_meta"])
def test_corrupt_cache_entry_is_rebuilt(tmp_path, damage):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture="jumprelu")
    first = load_sae(local(folder), cache_root=tmp_path / "cache")
    entry = _cache_entry(tmp_path / "cache")
    weights, meta = entry / "sae.safetensors", entry / "meta.json"
    if damage == "garbage_weights":
        weights.write_bytes(b"\x07" * weights.stat().st_size)
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "bad_meta":
        meta.write_text('{"format": ')
    else:
        meta.unlink()
    again = load_sae(local(folder), cache_root=tmp_path / "cache")
    for name in sae_mod.ARRAY_FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(again, name)), np.asarray(getattr(first, name)))
    assert json.loads(meta.read_text())["format"] == sae_loading.CACHE_FORMAT  # repaired on disk
    assert sae_loading._read_cache(entry) is not None
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp")]


def test_unknown_release_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError, match="sae.release") as info:
        load_sae(SAEConfig(release="gpt2-smal-res-jb", id="blocks.8.hook_resid_pre"), cache_root=tmp_path)
    assert "did you mean 'gpt2-small-res-jb'" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_id_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError, match="sae.id") as info:
        load_sae(SAEConfig(release="gpt2-small-res-jb", id="blocks.8.hook_resid_pr"), cache_root=tmp_path,
                 source="my.toml")
    message = str(info.value)
    assert message.startswith("my.toml: sae.id: ")
    assert "did you mean 'blocks.8.hook_resid_pre'" in message


def test_download_failure_is_a_user_error(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(SAE, "from_pretrained_with_cfg_and_sparsity", offline)
    with pytest.raises(UserError) as info:
        load_sae(SAEConfig(release="gpt2-small-res-jb", id="blocks.8.hook_resid_pre"), cache_root=tmp_path)
    message = str(info.value)
    for part in ("gpt2-small-res-jb", "blocks.8.hook_resid_pre", "sae.path", "HF_TOKEN"):
        assert part in message
    assert "\n" not in message


def test_local_path_that_is_not_an_sae_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="sae.path: .* is not a sae-lens SAE folder"):
        load_sae(local(tmp_path / "empty"), cache_root=tmp_path / "cache")
    with pytest.raises(ConfigError, match="sae.path: .* is not a folder"):
        load_sae(local(tmp_path / "nowhere"), cache_root=tmp_path / "cache")


def test_unfolded_whitening_encodes_the_raw_input_as_sae_lens_and_warns(tmp_path):
    """sae-lens's trainer folds covariance whitening into the weights; a config that still names it is
    encoded on the raw input by sae-lens, and by us, with a warning."""
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture="jumprelu", seed=6)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "covariance_whitening"}))
    with pytest.warns(UserWarning, match="normalize_activations='covariance_whitening'"):
        params = load_sae(local(folder), cache_root=tmp_path / "cache")
    assert params.normalize_activations == "covariance_whitening"
    x = random_input(2)
    acts_ref, pre_ref, _ = sae_lens_outputs(folder, x)
    np.testing.assert_allclose(np.asarray(activations(params, jnp.asarray(x.numpy()))), acts_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(pre_activations(params, jnp.asarray(x.numpy()))), pre_ref, atol=1e-5,
                               rtol=0)


def fake_sae(d_in: int, d_sae: int, hook_name: str = HOOK, hf_hook_name: str | None = None) -> SAEParams:
    return SAEParams(W_enc_DxS=jnp.zeros((d_in, d_sae)), b_enc_S=jnp.zeros(d_sae),
                     W_dec_SxD=jnp.zeros((d_sae, d_in)), b_dec_D=jnp.zeros(d_in), threshold_S=jnp.zeros(d_sae),
                     architecture="standard", k=0,
                     apply_b_dec_to_input=True, normalize_activations="none", hook_name=hook_name,
                     d_in=d_in, d_sae=d_sae, dtype="float32", hf_hook_name=hf_hook_name)


def test_feature_index_out_of_range():
    sae = fake_sae(4, 24576)
    assert check_feature_index(sae, 24575) == 24575
    with pytest.raises(UserError) as info:
        check_feature_index(sae, 99999)
    assert str(info.value) == "feature.index: 99999 is out of range for this SAE (0..24575)"
    with pytest.raises(ConfigError, match=r"^c.toml: feature.index: -1 is out of range"):
        check_feature_index(sae, -1, source="c.toml")


def test_hook_not_in_model(tiny_pair):
    model = tiny_pair.model  # GPT-2: 2 layers, d_model 32, 4 heads of 8, d_mlp 128
    with pytest.raises(UserError, match=r"^sae: hook 'blocks.8.hook_resid_pre' is not in the model"):
        check_sae_fits(fake_sae(32, 64, "blocks.8.hook_resid_pre"), model)
    with pytest.raises(UserError, match=r"^sae: unknown hook point 'hook_q'"):
        check_sae_fits(fake_sae(32, 64, "blocks.0.hook_q"), model)
    with pytest.raises(UserError, match=r"^sae: hook 'transformer.h.0.attn.c_q': this model has no module 'attn.c_q'"):
        check_sae_fits(fake_sae(32, 64, "blocks.0.hook_q", hf_hook_name="transformer.h.0.attn.c_q"), model)
    assert check_sae_fits(fake_sae(32, 64, "blocks.1.hook_resid_post"), model).layer == 1
    assert check_sae_fits(fake_sae(32, 64, "blocks.0.attn.hook_z"), model).point == "attn.hook_z"
    hf = check_sae_fits(fake_sae(32, 64, "blocks.1.hook_resid_post", hf_hook_name="transformer.h.1"), model)
    assert (hf.layer, hf.point, hf.transformer_lens) == (1, "hook_resid_post", False)


def test_width_mismatch(tiny_pair):
    model = tiny_pair.model
    with pytest.raises(UserError) as info:
        check_sae_fits(fake_sae(768, 64, "blocks.1.hook_resid_pre"), model)
    assert str(info.value) == (f"sae: the SAE reads 768-wide activations at 'blocks.1.hook_resid_pre' but model "
                               f"'{model.name}' has d_model = 32 there")
    # MLP hooks are d_mlp wide, hook_z n_heads * head_dim
    check_sae_fits(fake_sae(128, 64, "blocks.0.mlp.hook_post"), model)
    with pytest.raises(UserError, match="has d_mlp = 128 there"):
        check_sae_fits(fake_sae(32, 64, "blocks.0.mlp.hook_post"), model)
    with pytest.raises(UserError, match=r"has n_heads \* head_dim = 32 there"):
        check_sae_fits(fake_sae(64, 64, "blocks.0.attn.hook_z"), model)


def _in_hub_cache(folder: Path, repo_id: str, subfolder: str) -> Path:
    """`folder`'s files where huggingface_hub keeps a download of `repo_id`/`subfolder`:
    models--ORG--NAME/{refs/main, snapshots/<commit>/<subfolder>/files}."""
    import shutil

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit / subfolder, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_a_registry_sae_without_a_network_fails_at_once_in_one_line(tmp_path, hub_host_unresolvable):
    with pytest.raises(UserError) as info:
        load_sae(SAEConfig(release="gpt2-small-res-jb", id="blocks.8.hook_resid_pre"), cache_root=tmp_path)
    assert str(info.value) == (
        "sae: cannot load 'gpt2-small-res-jb' / 'blocks.8.hook_resid_pre' from the Hugging Face hub or its local "
        "cache: it is not in the local cache and the hub is unreachable (huggingface.co does not resolve). Set "
        "sae.path to a local sae-lens folder, or set HF_TOKEN for gated or private SAEs")


def test_registry_sae_loads_from_the_hub_cache_with_registry_metadata(tmp_path):
    """The real from_pretrained path, offline, on a random SAE laid out as the hub cache holds
    gpt2-small-res-jb: center_writes comes from the release's model_from_pretrained_kwargs override,
    neuronpedia_id from the registry, the densities from its sparsity file; the second load is served
    from our cache (the hub copy deleted in between)."""
    import shutil

    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, "blocks.8.hook_resid_pre", seed=5)
    repo = _in_hub_cache(folder, "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")
    cfg = SAEConfig(release="gpt2-small-res-jb", id="blocks.8.hook_resid_pre")
    params, density = sae_loading.load_sae_with_density(cfg, cache_root=tmp_path / "cache")
    assert (params.release, params.id, params.path) == ("gpt2-small-res-jb", "blocks.8.hook_resid_pre", None)
    assert params.center_writes is True
    assert params.neuronpedia_id == "gpt2-small/8-res-jb"
    assert params.display_name == "gpt2-small-res-jb / blocks.8.hook_resid_pre"
    np.testing.assert_array_equal(np.asarray(params.W_enc_DxS), SAE.load_from_disk(folder).W_enc.detach().numpy())
    np.testing.assert_array_equal(density, _sparsity(folder))
    shutil.rmtree(repo)
    again, density_again = sae_loading.load_sae_with_density(cfg, cache_root=tmp_path / "cache")
    assert again.center_writes is True and again.neuronpedia_id == "gpt2-small/8-res-jb"
    np.testing.assert_array_equal(density_again, density)


def _sparsity(folder: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(folder / "sparsity.safetensors")["sparsity"]


def test_densities_come_from_the_sparsity_file_and_survive_the_cache(tmp_path):
    from safetensors.numpy import save_file

    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, seed=2)
    expected = _sparsity(folder)
    expected[::7] = -10.0  # latents that never fired, as sae-lens's trainer records them
    save_file({"sparsity": expected}, folder / "sparsity.safetensors")
    first = sae_loading.load_sae_with_density(local(folder), cache_root=tmp_path / "cache")[1]
    cached = sae_loading.load_sae_with_density(local(folder), cache_root=tmp_path / "cache")[1]
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(cached, expected)
    save_file({"sparsity": expected - 1.0}, folder / "sparsity.safetensors")  # a new record in place
    np.testing.assert_array_equal(sae_loading.load_sae_with_density(local(folder), cache_root=tmp_path / "cache")[1],
                                  expected - 1.0)


@pytest.mark.parametrize("sparsity", ["none", "damaged", "wrong_shape", "nan"])
def test_without_usable_densities_liveness_is_unknown(tmp_path, sparsity):
    from safetensors.numpy import save_file

    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, write_sparsity=sparsity != "none")
    path = folder / "sparsity.safetensors"
    if sparsity == "damaged":
        path.write_bytes(path.read_bytes()[:40])
    elif sparsity == "wrong_shape":
        save_file({"sparsity": np.zeros(D_SAE + 1, np.float32)}, path)
    elif sparsity == "nan":
        save_file({"sparsity": np.full(D_SAE, np.nan, np.float32)}, path)
    params, density = sae_loading.load_sae_with_density(local(folder), cache_root=tmp_path / "cache")
    assert density is None and params.d_sae == D_SAE
    assert sae_loading.load_sae_with_density(local(folder), cache_root=tmp_path / "cache")[1] is None


def test_gemma_scope_2_sae_loads_offline_from_the_hub_cache(tmp_path):
    """sae-lens's Gemma Scope 2 loader asks the hub for the weights' shapes over HTTP even when the file
    is cached; with HF_HUB_OFFLINE=1 (as every test runs) it must be served from the cache. Laid out as
    google/gemma-scope-2-1b-pt holds it: <folder>/config.json + <folder>/params.safetensors."""
    from safetensors.numpy import save_file

    folder = tmp_path / "gs2"
    folder.mkdir()
    rng = np.random.default_rng(0)
    weights = {"w_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
               "w_dec": rng.normal(size=(D_SAE, D_IN)).astype(np.float32),
               "b_enc": rng.normal(size=D_SAE).astype(np.float32), "b_dec": rng.normal(size=D_IN).astype(np.float32),
               "threshold": rng.uniform(0, 1, size=D_SAE).astype(np.float32)}
    save_file(weights, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
                                                    "hf_hook_point_in": "model.layers.13.output"}))
    # (the small-L0 one: the sample config's medium one is laid out by tests/test_samples.py)
    _in_hub_cache(folder, "google/gemma-scope-2-1b-pt", "resid_post/layer_13_width_16k_l0_small")
    cfg = SAEConfig(release="gemma-scope-2-1b-pt-res", id="layer_13_width_16k_l0_small")
    params = sae_loading.load_sae(cfg, cache_root=tmp_path / "cache")
    assert (params.architecture, params.d_in, params.d_sae) == ("jumprelu", D_IN, D_SAE)
    assert (params.hook_name, params.read_hook) == ("blocks.13.hook_resid_post", "model.layers.13.output")
    assert params.model_name == "google/gemma-3-1b-pt"
    assert params.release == "gemma-scope-2-1b-pt-res" and params.neuronpedia_id is None  # none on Neuronpedia
    np.testing.assert_array_equal(np.asarray(params.W_enc_DxS), weights["w_enc"])
    np.testing.assert_array_equal(np.asarray(params.threshold_S), weights["threshold"])


def test_a_dictionary_learning_sae_is_read_on_the_raw_residual(tmp_path, tiny_pair):
    """SAEBench's sae_bench_pythia70m_* SAEs (sae-lens loader dictionary_learning_1) were trained with
    dictionary_learning on the transformers model: no TransformerLens centring on a LayerNorm model, though
    their configs name no model class. Laid out as canrager/lm_sae holds them: <folder>/{config.json, ae.pt}
    (a plain state dict, read by torch's weights-only loader)."""
    from epo_tui.engine.pairing import ModelWithSAE

    folder = tmp_path / "dl"
    folder.mkdir()
    rng = np.random.default_rng(1)
    torch.save({"encoder.weight": torch.tensor(rng.normal(size=(D_SAE, D_IN)), dtype=torch.float32),
                "encoder.bias": torch.zeros(D_SAE), "decoder.weight": torch.tensor(rng.normal(size=(D_IN, D_SAE)),
                                                                                  dtype=torch.float32),
                "bias": torch.zeros(D_IN)}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({
        "trainer": {"layer": 3, "dict_class": "AutoEncoder", "activation_dim": D_IN, "dict_size": D_SAE,
                    "lm_name": "EleutherAI/pythia-70m-deduped"}, "buffer": {"ctx_len": 128}}))
    sae_id = "blocks.3.hook_resid_post__trainer_10"
    _in_hub_cache(folder, "canrager/lm_sae", "pythia70m_sweep_standard_ctx128_0712/resid_post_layer_3/trainer_10")
    params = sae_loading.load_sae(SAEConfig(release="sae_bench_pythia70m_sweep_standard_ctx128_0712", id=sae_id),
                              cache_root=tmp_path / "cache")
    assert (params.hook_name, params.model_class_name) == ("blocks.3.hook_resid_post", "AutoModelForCausalLM")
    np.testing.assert_array_equal(np.asarray(params.W_enc_DxS), torch.load(folder / "ae.pt")["encoder.weight"].T)
    gpt2 = tiny_pair.model  # a LayerNorm model, as Pythia: the raw residual for this SAE ...
    assert ModelWithSAE(model=gpt2, sae=params).center_writes is False
    assert ModelWithSAE(model=gpt2, sae=tiny_pair.sae).center_writes is True  # ... centred for a TL-trained one

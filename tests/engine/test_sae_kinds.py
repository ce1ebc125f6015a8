"""Every SAE kind sae-lens can run (issue 13 §3), encoded in JAX exactly as sae-lens encodes it.

Each SAE is random, made and saved by sae-lens itself (`sae_writer`: its own config classes and
save_model, or its trainer's save_inference_model), loaded through `load_sae`, and compared with
sae-lens's `encode` and `hook_sae_acts_pre` within 1e-5, with and without each input normalization and
b_dec. Then: attention-head SAEs (hook_z), the norm scaling factor sae-lens folds, the metadata kept for
transcoders and transformers hook names, PyTorch-pickled registry releases (loaded with torch's
weights-only unpickler; a pickle that would run code is refused and runs nothing), and bad input
through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from cli_run import run_cli
from sae_lens import SAE

from epo_tui.config import FeatureConfig, SAEConfig
from epo_tui.engine import sae as sae_mod
from epo_tui.engine import sae_loading
from epo_tui.engine.sae import activations, feature_pre_and_act, pre_activations
from epo_tui.engine.sae_loading import load_sae
from epo_tui.engine.sae_writer import ARCHITECTURES, TRAINING_ONLY, TRANSCODERS, write_random_sae
from epo_tui.errors import ConfigError, UserError

D_IN, D_SAE, D_OUT, K = 32, 96, 24, 8
HEADS, HEAD_DIM = 4, 8  # an attention-head SAE's input: 4 heads of 8 concatenated (D_IN)
HOOK = "blocks.1.hook_resid_pre"
TEXT = "Hello world, the quick brown fox"


def local(folder: Path) -> SAEConfig:
    return SAEConfig(release=None, id=None, path=str(folder))


def random_input(seed: int = 0, shape: tuple[int, ...] = (3, 7, D_IN)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))  # rows of norm ~ sqrt(D_IN)


def as_sae_lens_runs_it(folder: Path, training_layout: bool, scratch: Path) -> SAE:
    """sae-lens's inference SAE for `folder`; a training checkpoint becomes what its trainer saves."""
    if training_layout:
        from sae_lens.saes.sae import TrainingSAE

        TrainingSAE.load_from_disk(folder).save_inference_model(scratch)
        folder = scratch
    return SAE.load_from_disk(folder, device="cpu")


def sae_lens_encode(sae: SAE, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(acts, hidden_pre) as sae-lens computes them (hidden_pre from its hook_sae_acts_pre)."""
    with torch.no_grad():
        acts = sae.encode(x)
        _, cache = sae.run_with_cache(x, names_filter="hook_sae_acts_pre")
    return acts.numpy(), cache["hook_sae_acts_pre"].numpy()


def assert_encodes_like(params, x_flat: torch.Tensor, acts_ref: np.ndarray, pre_ref: np.ndarray) -> None:
    """activations, pre_activations and feature_pre_and_act (several latents, and one) match sae-lens."""
    x = jnp.asarray(x_flat.numpy())
    np.testing.assert_allclose(np.asarray(jax.jit(activations)(params, x)), acts_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(jax.jit(pre_activations)(params, x)), pre_ref, atol=1e-5, rtol=0)
    selected = np.array([0, 5, params.d_sae - 1, int(np.argmax(np.abs(acts_ref[0, 0])))])
    pre_F, act_F = jax.jit(feature_pre_and_act)(params, x, jnp.asarray(selected))
    np.testing.assert_allclose(np.asarray(act_F), acts_ref[..., selected], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(pre_F), pre_ref[..., selected], atol=1e-5, rtol=0)
    one_pre, one_act = feature_pre_and_act(params, x, int(selected[-1]))
    assert one_act.shape == x.shape[:-1]
    np.testing.assert_allclose(np.asarray(one_act), acts_ref[..., selected[-1]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(one_pre), pre_ref[..., selected[-1]], atol=1e-5, rtol=0)


def _cases():
    for architecture in ARCHITECTURES:
        b_decs = (False,) if architecture in TRANSCODERS else (True, False)  # sae-lens refuses it there
        layouts = (False, True) if architecture in TRAINING_ONLY else (False,)
        for layout in layouts:
            for b_dec in b_decs:
                yield architecture, layout, b_dec, "none"
            for normalize in ("constant_norm_rescale", "layer_norm"):
                yield architecture, layout, b_decs[0], normalize


@pytest.mark.parametrize(("architecture", "training_layout", "apply_b_dec", "normalize"), list(_cases()))
def test_every_architecture_encodes_as_sae_lens(tmp_path, architecture, training_layout, apply_b_dec, normalize):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture=architecture, seed=3, k=K,
                              apply_b_dec_to_input=apply_b_dec, normalize_activations=normalize, d_out=D_OUT,
                              hook_name_out="blocks.1.hook_mlp_out", training_layout=training_layout)
    saved_as = json.loads((folder / "cfg.json").read_text())["architecture"]
    assert saved_as == ("jumprelu" if architecture in TRAINING_ONLY and not training_layout else architecture)
    params = load_sae(local(folder), cache_root=tmp_path / "cache")
    reference = as_sae_lens_runs_it(folder, training_layout, tmp_path / "inference")
    x = random_input()
    acts_ref, pre_ref = sae_lens_encode(reference, x)
    assert_encodes_like(params, x, acts_ref, pre_ref)

    assert params.architecture == reference.cfg.architecture()
    transcoder = architecture in TRANSCODERS
    assert params.kind == ("skip_transcoder" if "skip" in architecture else "transcoder" if transcoder else "sae")
    assert params.d_out == (D_OUT if transcoder else D_IN)
    assert params.W_dec_SxD.shape == (D_SAE, params.d_out) and params.b_dec_D.shape == (params.d_out,)
    assert params.apply_b_dec_to_input == (apply_b_dec and not transcoder)
    # the random SAE exercises the activation: some latents fire, most do not
    assert 0.02 < (acts_ref != 0).mean() < 0.8
    if params.activation == "jumprelu":  # some pre-activations sit between 0 and the threshold
        assert ((pre_ref > 0) & (acts_ref == 0)).any()
    if architecture in TRAINING_ONLY:  # sae-lens's inference form: one batch threshold for every latent
        assert params.architecture == "jumprelu" and len(np.unique(np.asarray(params.threshold_S))) == 1
    if params.activation in ("topk", "abstopk"):
        assert ((acts_ref != 0).sum(-1) <= K).all()
    if params.activation == "abstopk":
        assert (acts_ref < 0).any() and (acts_ref > 0).any()
    if params.activation == "gated":  # the gate closes latents with a positive magnitude, and opens others
        with torch.no_grad():
            gate = (reference.process_sae_in(x) @ reference.W_enc + reference.b_gate).numpy()
        assert ((gate <= 0) & (pre_ref > 0)).any() and ((gate > 0) & (pre_ref <= 0)).any()
        assert ((gate > 0) & (pre_ref > 0)).any()


def test_gated_pre_activation_is_the_activation_whenever_active(tmp_path):
    """The search's signal for a gated latent: the magnitude pre-activation, equal to the activation
    when active, and above b_mag - exp(r_mag) * b_gate exactly when the gate is open."""
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture="gated", seed=5)
    params = load_sae(local(folder), cache_root=tmp_path / "cache")
    x = jnp.asarray(random_input(1).numpy())
    pre, act = (np.asarray(a) for a in feature_pre_and_act(params, x, jnp.arange(D_SAE)))
    np.testing.assert_array_equal(act[act > 0], pre[act > 0])
    opens_at = np.asarray(params.b_enc_S - params.mag_scale_S * params.b_gate_S)
    margin = np.abs(pre - opens_at) > 1e-4  # away from float rounding at the boundary
    gate_open = np.asarray(sae_mod.process_input(params, x) @ params.W_enc_DxS + params.b_gate_S) > 0
    np.testing.assert_array_equal((pre > opens_at)[margin], gate_open[margin])


@pytest.mark.parametrize(("architecture", "apply_b_dec", "normalize"),
                         [("standard", True, "none"), ("jumprelu", False, "none"), ("topk", True, "layer_norm"),
                          ("standard", True, "constant_norm_rescale")])
def test_attention_head_sae_encodes_the_heads_concatenated(tmp_path, architecture, apply_b_dec, normalize):
    """reshape_activations='hook_z': sae-lens reads ...x heads x head_dim and flattens it; we are given
    the flattened ...x(heads*head_dim) (the model records attn.hook_z so)."""
    folder = write_random_sae(tmp_path / "sae", HEADS * HEAD_DIM, D_SAE, "blocks.1.attn.hook_z", seed=7, k=K,
                              architecture=architecture, apply_b_dec_to_input=apply_b_dec,
                              normalize_activations=normalize, reshape_activations="hook_z")
    params = load_sae(local(folder), cache_root=tmp_path / "cache")
    assert (params.hook_name, params.d_in) == ("blocks.1.attn.hook_z", HEADS * HEAD_DIM)
    x_heads = random_input(2, (3, 7, HEADS, HEAD_DIM))
    acts_ref, pre_ref = sae_lens_encode(SAE.load_from_disk(folder), x_heads)
    assert acts_ref.shape == (3, 7, D_SAE)
    assert_encodes_like(params, x_heads.reshape(3, 7, HEADS * HEAD_DIM), acts_ref, pre_ref)


def test_attention_head_sae_pairs_with_the_model_and_scores(tiny_dir, tmp_path):
    """A hook_z SAE on the tiny GPT-2 (4 heads of 8): paired (its width checked against n_heads * head_dim)
    and scored on the model's attn.hook_z, heads concatenated, as TransformerLens computes it."""
    from epo_tui.config import load_config
    from epo_tui.engine.pairing import as_batch, load_model_with_sae
    from epo_tui.engine.scoring import score_text
    from epo_tui.engine.tiny import write_config

    write_random_sae(tmp_path / "sae", 32, D_SAE, "blocks.1.attn.hook_z", seed=7, reshape_activations="hook_z")
    config = load_config(str(write_config(tmp_path / "config.toml", str(tiny_dir / "model"), "sae")))
    pair = load_model_with_sae(config)
    ids = pair.model.encode("The quick brown fox")
    _, z_1xLxHK = pair.forward(as_batch(ids), logits=False)
    acts_LxS = np.asarray(activations(pair.sae, z_1xLxHK[0]))
    feature = int(acts_LxS.max(axis=0).argmax())
    assert acts_LxS[:, feature].max() > 0
    np.testing.assert_allclose(score_text(pair, "The quick brown fox", feature)["activations"], acts_LxS[:, feature],
                               atol=1e-6)
    write_random_sae(tmp_path / "wide", 48, D_SAE, "blocks.1.attn.hook_z", seed=7, reshape_activations="hook_z")
    wide = load_config(str(write_config(tmp_path / "wide.toml", str(tiny_dir / "model"), "wide")))
    with pytest.raises(UserError, match=r"^sae: the SAE reads 48-wide activations at 'blocks.1.attn.hook_z' but "
                                        r"model '.*' has n_heads \* head_dim = 32 there$"):
        load_model_with_sae(wide)


def test_unfolded_norm_scaling_encodes_the_raw_input_as_sae_lens_and_warns(tmp_path):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture="jumprelu", seed=8,
                              normalize_activations="expected_average_only_in")
    with pytest.warns(UserWarning, match="expected_average_only_in.*raw activations are encoded"):
        params = load_sae(local(folder), cache_root=tmp_path / "cache")
    x = random_input(3)
    assert_encodes_like(params, x, *sae_lens_encode(SAE.load_from_disk(folder), x))


def _in_hub_cache(files: dict[str, Path], repo_id: str) -> Path:
    """`files` (path in the repo -> local file) where huggingface_hub keeps a download of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--"))
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


def _registry_folder(release: str, sae_id: str) -> tuple[str, str]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory()[release]
    return lookup.repo_id, lookup.saes_map[sae_id]


def test_registry_norm_scaling_factor_is_folded_as_sae_lens_folds_it(tmp_path, monkeypatch):
    """from_pretrained folds the factor the registry knows: encode(x) is the trained SAE's encode(x * f)."""
    import sae_lens.saes.sae as sae_lens_sae

    factor = 2.5
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, "blocks.8.hook_resid_pre", architecture="jumprelu",
                              seed=9, normalize_activations="expected_average_only_in", input_norm=factor * 5.66)
    repo_id, name = _registry_folder("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    repo = _in_hub_cache({f"{name}/{f.name}": f for f in folder.iterdir()}, repo_id)
    monkeypatch.setattr(sae_lens_sae, "get_norm_scaling_factor", lambda release, sae_id: factor)
    try:
        params = load_sae(SAEConfig(release="gpt2-small-res-jb", id="blocks.8.hook_resid_pre"),
                          cache_root=tmp_path / "cache")
    finally:
        shutil.rmtree(repo)
    assert params.normalize_activations == "none"
    x = random_input(4)
    assert_encodes_like(params, x, *sae_lens_encode(SAE.load_from_disk(folder), x * factor))


def test_registry_training_checkpoint_loads_as_sae_lens_saves_it_for_inference(tmp_path):
    """A release whose cfg.json is a batchtopk training checkpoint (sae-lens's inference registry has no
    such class): loaded with sae-lens's training class, then turned into its inference JumpReLU."""
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, "blocks.8.hook_resid_pre", architecture="batchtopk",
                              seed=10, k=K, training_layout=True)
    repo_id, name = _registry_folder("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    repo = _in_hub_cache({f"{name}/{f.name}": f for f in folder.iterdir()}, repo_id)
    try:
        params = load_sae(SAEConfig(release="gpt2-small-res-jb", id="blocks.8.hook_resid_pre"),
                          cache_root=tmp_path / "cache")
    finally:
        shutil.rmtree(repo)
    assert params.architecture == "jumprelu" and params.neuronpedia_id == "gpt2-small/8-res-jb"
    x = random_input(6)
    assert_encodes_like(params, x, *sae_lens_encode(as_sae_lens_runs_it(folder, True, tmp_path / "inference"), x))


def test_transcoder_metadata_and_read_hook_survive_the_cache(tmp_path):
    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, "blocks.1.hook_mlp_in", seed=2, d_out=D_OUT,
                              architecture="jumprelu_skip_transcoder", hook_name_out="blocks.1.hook_mlp_out",
                              hf_hook_name="model.layers.1.pre_feedforward_layernorm.output",
                              hf_hook_name_out="model.layers.1.post_feedforward_layernorm.output")
    first = load_sae(local(folder), cache_root=tmp_path / "cache")
    meta = json.loads(next((tmp_path / "cache" / "saes").iterdir()).joinpath("meta.json").read_text())
    again = load_sae(local(folder), cache_root=tmp_path / "cache")  # from the cache
    for params in (first, again):
        assert (params.kind, params.architecture, params.d_out) == ("skip_transcoder", "jumprelu_skip_transcoder",
                                                                    D_OUT)
        assert params.hook_name == "blocks.1.hook_mlp_in" and params.hook_name_out == "blocks.1.hook_mlp_out"
        assert params.read_hook == params.hf_hook_name == "model.layers.1.pre_feedforward_layernorm.output"
        assert params.hf_hook_name_out == "model.layers.1.post_feedforward_layernorm.output"
    assert meta["format"] == sae_loading.CACHE_FORMAT and meta["kind"] == "skip_transcoder" and meta["d_out"] == D_OUT
    plain = load_sae(local(write_random_sae(tmp_path / "plain", D_IN, D_SAE, HOOK)), cache_root=tmp_path / "cache")
    assert plain.read_hook == HOOK and plain.hf_hook_name is None and plain.kind == "sae"


def test_direction_target_is_refused_for_a_transcoder(tmp_path):
    from epo_tui.engine.objective import build_target
    from epo_tui.engine.pairing import ModelWithSAE

    folder = write_random_sae(tmp_path / "sae", D_IN, D_SAE, HOOK, architecture="transcoder", d_out=D_OUT,
                              hook_name_out="blocks.1.hook_mlp_out")
    pair = ModelWithSAE(model=None, sae=load_sae(local(folder), cache_root=tmp_path / "cache"))
    with pytest.raises(ConfigError) as info:
        build_target(pair, FeatureConfig(index=3, kind="direction"), source="c.toml")
    assert str(info.value) == ("c.toml: feature.kind: 'direction' reads the SAE's hook along a decoder row, but "
                               "this SAE is a transcoder, whose decoder writes to blocks.1.hook_mlp_out; use kind "
                               "'sae' (its latents), or 'neuron', 'logit' or 'vector'")


# ----------------------------------------------------------------------------------------------
# PyTorch-pickled registry releases: torch's weights-only unpickler, forced


class Bait:
    """Unpickling this creates `marker`: proof that the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hook_z_release(tmp_path: Path, sae_id: str, state: dict) -> Path:
    """gpt2-small-hook-z-kk's `sae_id` in the hub cache (sae-lens's connor_rob_hook_z loader, which
    torch.loads a .pt): `state` saved with torch.save, and its `_cfg.json`."""
    repo_id, name = _registry_folder("gpt2-small-hook-z-kk", sae_id)
    weights = tmp_path / "weights.pt"
    torch.save(state, weights)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"act_size": HEADS * HEAD_DIM, "dict_size": D_SAE,
                               "act_name": f"blocks.{sae_id.split('.')[1]}.attn.hook_z"}))
    return _in_hub_cache({name: weights, name.split(".pt")[0] + "_cfg.json": cfg}, repo_id)


def test_a_pickled_state_dict_loads_through_its_sae_lens_loader(tmp_path):
    g = torch.Generator().manual_seed(11)
    d = HEADS * HEAD_DIM
    state = {"W_enc": torch.randn(d, D_SAE, generator=g) / d**0.5,
             "b_enc": -0.3 + 0.3 * torch.randn(D_SAE, generator=g),
             "W_dec": torch.randn(D_SAE, d, generator=g) / d**0.5, "b_dec": 0.1 * torch.randn(d, generator=g)}
    repo = _hook_z_release(tmp_path, "blocks.0.hook_z", state)
    config = SAEConfig(release="gpt2-small-hook-z-kk", id="blocks.0.hook_z")
    try:
        params = load_sae(config, cache_root=tmp_path / "cache")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = SAE.from_pretrained(config.release, config.id, device="cpu")
    finally:
        shutil.rmtree(repo)
    assert (params.hook_name, params.d_in, params.neuronpedia_id) == ("blocks.0.attn.hook_z", d, "gpt2-small/0-att-kk")
    np.testing.assert_array_equal(np.asarray(params.W_enc_DxS), state["W_enc"].numpy())
    x_heads = random_input(5, (2, 5, HEADS, HEAD_DIM))
    assert_encodes_like(params, x_heads.reshape(2, 5, d), *sae_lens_encode(reference, x_heads))
    assert os.environ.get(sae_loading.FORCE_WEIGHTS_ONLY) is None  # the environment is as it was


@pytest.mark.parametrize("user_env", [None, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch, user_env):
    if user_env:  # a user who asked torch for full unpickling everywhere does not get it here
        monkeypatch.setenv(user_env, "1")
    marker = tmp_path / "MARKER"
    d = HEADS * HEAD_DIM
    state = {"W_enc": torch.zeros(d, D_SAE), "b_enc": torch.zeros(D_SAE), "W_dec": torch.zeros(D_SAE, d),
             "b_dec": Bait(marker)}
    repo = _hook_z_release(tmp_path, "blocks.1.hook_z", state)
    try:
        with pytest.raises(UserError) as info:
            load_sae(SAEConfig(release="gpt2-small-hook-z-kk", id="blocks.1.hook_z"), cache_root=tmp_path / "cache")
        assert not marker.exists(), "the pickle ran code"
        message = str(info.value)
        assert message == ("sae: 'gpt2-small-hook-z-kk' / 'blocks.1.hook_z' is a PyTorch pickle that names io.open; "
                           "epo-tui unpickles checkpoints only with torch's weights-only loader (tensors and plain "
                           "containers), so it is refused")
        assert os.environ.get(user_env or sae_loading.FORCE_WEIGHTS_ONLY) == ("1" if user_env else None)
        pt = next(repo.glob("snapshots/*/*.pt"))
        torch.load(pt, weights_only=False)  # the bait is live: unpickled for real, it runs
        assert marker.exists()
    finally:
        shutil.rmtree(repo)


def test_the_forced_weights_only_load_overrides_a_caller_asking_for_pickles(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"w": torch.ones(2), "bait": Bait(marker)}, tmp_path / "bait.pt")
    torch.save({"w": torch.ones(2), "meta": {"k": [1, 2.5, "x"]}}, tmp_path / "plain.pt")
    with sae_loading._weights_only_unpickling():
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(tmp_path / "bait.pt", weights_only=False)
        plain = torch.load(tmp_path / "plain.pt", weights_only=False)
    assert not marker.exists()
    assert plain["meta"] == {"k": [1, 2.5, "x"]} and plain["w"].tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------
# Through the CLI, on the tiny model


def _pair_config(folder: Path, model: Path, sae: Path) -> Path:
    path = folder / "pair.toml"
    path.write_text(f'[model]\npath = "{model}"\n[sae]\npath = "{sae}"\n[feature]\nindex = 0\n')
    return path


@pytest.mark.parametrize(("architecture", "needles"), [
    ("nonsense", ("architecture 'nonsense' is not supported (supported: standard, jumprelu",)),
    ("temporal", ("architecture 'temporal' is not supported: its latents attend over earlier tokens'",
                  "jumprelu_skip_transcoder, batchtopk, matryoshka_batchtopk)")),
    ("jumprelu_transcodr", ("architecture 'jumprelu_transcodr' is not supported; did you mean "
                            "'jumprelu_transcoder'?",)),
])
def test_an_unsupported_architecture_is_one_line_and_exit_2(tiny_dir, tmp_path, architecture, needles):
    folder = write_random_sae(tmp_path / "sae", D_IN, 16, HOOK)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": architecture}))
    code, out, err = run_cli("score", "--config", _pair_config(tmp_path, tiny_dir / "model", folder), "hello")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"sae '{folder}'" in err
    for needle in needles:
        assert needle in err


@pytest.fixture(scope="module")
def tiny_residual(tiny_dir):
    """(token ids, blocks.1.hook_resid_pre as sae-lens saw it: TransformerLens's centred residual) of TEXT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    ids = [tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()
    with torch.no_grad():
        resid = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
    return ids, resid - resid.mean(-1, keepdim=True)


@pytest.mark.parametrize(("architecture", "training_layout"), [
    ("gated", False), ("abstopk", False), ("jumprelu_skip_transcoder", False), ("matryoshka_batchtopk", True)])
def test_score_reports_each_kind_as_sae_lens(tiny_dir, tiny_residual, tmp_path, architecture, training_layout):
    ids, resid = tiny_residual
    folder = write_random_sae(tmp_path / "sae", D_IN, 64, HOOK, architecture=architecture, seed=4, k=K, d_out=D_OUT,
                              hook_name_out="blocks.1.hook_mlp_out", input_norm=0.65,
                              training_layout=training_layout)
    acts_ref, _ = sae_lens_encode(as_sae_lens_runs_it(folder, training_layout, tmp_path / "inference"), resid)
    feature = int(np.argmax(np.abs(acts_ref).max(0)))
    assert np.abs(acts_ref[:, feature]).max() > 0
    config = _pair_config(tmp_path, tiny_dir / "model", folder)
    code, out, err = run_cli("score", "--config", config, "--feature", feature, "--json", TEXT)
    assert code == 0, err
    scored = json.loads(out)
    assert scored["token_ids"] == ids
    np.testing.assert_allclose(scored["activations"], acts_ref[:, feature], atol=1e-4)


@pytest.mark.parametrize("architecture", ["gated", "abstopk", "jumprelu_transcoder", "skip_transcoder"])
def test_sae_target_reads_every_kind_as_sae_lens(tiny_dir, tiny_residual, tmp_path, architecture):
    """kind 'sae' optimizes sae-lens's hidden_pre and reports its activation, transcoders included."""
    from epo_tui.config import load_config
    from epo_tui.engine.objective import build_target, per_position
    from epo_tui.engine.pairing import load_model_with_sae

    ids, resid = tiny_residual
    folder = write_random_sae(tmp_path / "sae", D_IN, 64, HOOK, architecture=architecture, seed=12, k=K, d_out=D_OUT,
                              hook_name_out="blocks.1.hook_mlp_out", input_norm=0.65)
    acts_ref, pre_ref = sae_lens_encode(SAE.load_from_disk(folder), resid)
    features = (int(np.argmax(np.abs(acts_ref).max(0))), 3)
    pair = load_model_with_sae(load_config(str(_pair_config(tmp_path, tiny_dir / "model", folder))))
    target, arrays = build_target(pair, FeatureConfig(indices=features))
    _, hook = pair.forward(jnp.asarray([ids]), logits=False)
    optimized, reported = per_position(target, arrays, pair.sae, hook, None)
    np.testing.assert_allclose(np.asarray(optimized[0]), pre_ref[:, features], atol=1e-4)
    np.testing.assert_allclose(np.asarray(reported[0]), acts_ref[:, features], atol=1e-4)
    assert np.abs(np.asarray(reported[0])).max() > 0


@pytest.mark.parametrize(("hook", "d_in", "kind"), [
    ("blocks.1.attn.hook_z", 32, "hook_z"),  # through layer 1's W_O (heads concatenated)
    ("blocks.1.mlp.hook_post", 128, "mlp"),  # through layer 1's down projection
    ("blocks.1.ln2.hook_normalized", 32, "transcoder"),  # the decoder writes hook_mlp_out
])
def test_catalog_reads_every_decoder_as_the_residual_direction_it_writes(tiny_pair, tmp_path, hook, d_in, kind):
    """The feature list's top tokens for SAEs whose decoder is not in the residual basis: the row mapped
    to the residual (W_O / the MLP's output weight of the tiny GPT-2, written out here by hand) through
    the folded unembedding."""
    import dataclasses

    from epo_tui.engine.feature_catalog import compute_catalog

    extra = (dict(architecture="transcoder", d_out=32, hook_name_out="blocks.1.hook_mlp_out") if kind == "transcoder"
             else dict(reshape_activations="hook_z") if kind == "hook_z" else {})
    folder = write_random_sae(tmp_path / "sae", d_in, D_SAE, hook, seed=4, **extra)
    sae = load_sae(local(folder), cache_root=tmp_path / "cache")
    pair = dataclasses.replace(tiny_pair, sae=sae, log10_density_S=None)
    block = tiny_pair.model.params["blocks"][1]
    W_dec = np.asarray(sae.W_dec_SxD, np.float64)
    maps_to_residual = {"hook_z": block["w_o_HxKxD"].reshape(-1, 32), "mlp": block["w_out_FxD"],
                        "transcoder": np.eye(32)}[kind]
    rows = W_dec @ np.asarray(maps_to_residual, np.float64)
    logits = rows @ np.asarray(tiny_pair.model.folded_unembedding_VxD(), np.float64).T
    logits[:, tiny_pair.model.special_token_ids()] = -np.inf
    entries = compute_catalog(pair, k=5, show_progress=False)
    for entry, row in zip(entries, logits):
        assert set(entry.top_token_ids) == set(np.argsort(-row)[:5].tolist())


def test_catalog_of_an_sae_on_the_mlp_pre_activation_has_no_top_tokens(tiny_pair, tmp_path):
    import dataclasses

    from epo_tui.engine.feature_catalog import compute_catalog

    folder = write_random_sae(tmp_path / "sae", 128, D_SAE, "blocks.1.mlp.hook_pre", seed=4)
    pair = dataclasses.replace(tiny_pair, sae=load_sae(local(folder), cache_root=tmp_path / "cache"),
                               log10_density_S=None)
    entries = compute_catalog(pair, show_progress=False)
    assert len(entries) == D_SAE and all(entry.top_tokens == () for entry in entries)

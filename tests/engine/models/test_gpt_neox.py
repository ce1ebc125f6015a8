"""Our JAX GPT-NeoX (Pythia) against PyTorch: transformers for logits and module activations,
TransformerLens (built offline with its own NeoX config and weight conversion, processed as its
`from_pretrained` does) for every hook point, and sae-lens for an SAE read on TransformerLens's
activations.

The tiny checkpoints are made sensitive to what they test: initializer_range 0.3 so attention is far
from uniform, head_dim 16 so Pythia's quarter rotary turns 4 dims (with 2, NeoX's rotate-half and
GPT-J's rotate-adjacent layouts coincide), random norms and biases everywhere.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from family_parity import (ATOL, Case, check_bfloat16_close_to_float32, check_one_hot_input_matches_ids,
                           check_prefix_computed_once, hf_logits, hf_module_activations, max_diff, tl_value)

from epo_tui.config import ModelConfig
from epo_tui.engine.language_model import load_model
from epo_tui.engine.models import gpt_neox
from epo_tui.engine.models.hooks import BLOCK_POINTS, TL_ALIASES
from epo_tui.engine.models.layers import Rope
from epo_tui.engine.tiny import write_tiny_checkpoint
from epo_tui.errors import UserError

FAMILY = "gpt_neox"
# name: config overrides. "pythia" is Pythia's shape (tiny.py's defaults): parallel blocks, a quarter
# of each head rotates, exact GELU, untied head. "sequential" runs attention then MLP, rotates half of
# each head with base 100 (TransformerLens ignores the base) and uses the tanh GELU. "no bias" has no
# attention biases (TransformerLens cannot convert it), a tied head and ReLU.
CASES = {
    "pythia": dict(initializer_range=0.3),
    "sequential": dict(initializer_range=0.3, use_parallel_residual=False, rotary_pct=0.5, rotary_emb_base=100,
                       hidden_act="gelu_new"),
    "no bias": dict(initializer_range=0.3, attention_bias=False, tie_word_embeddings=True, hidden_act="relu"),
}
TL_CASES = ("pythia", "sequential")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("neox")
    return {name: Case(write_tiny_checkpoint(root / name.replace(" ", "-"), FAMILY, seed=1, **overrides), FAMILY)
            for name, overrides in CASES.items()}


def test_the_cases_are_the_variants_they_name(cases):
    cfgs = {name: case.model.cfg for name, case in cases.items()}
    assert cfgs["pythia"].parallel_residual and cfgs["pythia"].rope == Rope(10000.0, 4)
    assert cfgs["pythia"].activation == "gelu" and "unembed_VxD" in cases["pythia"].model.params
    assert not cfgs["sequential"].parallel_residual and cfgs["sequential"].rope == Rope(100.0, 8)
    assert not cfgs["no bias"].attention_bias and "unembed_VxD" not in cases["no bias"].model.params


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_float32_logits_match_transformers(cases, name, batch):
    case = cases[name]
    ids = case.ids(batch)
    logits, _ = case.model.forward(ids)
    assert logits.dtype == jnp.float32
    assert max_diff(logits, hf_logits(case, ids)) < ATOL


def test_pythia_config_keys_as_its_hub_files_write_them(cases, tmp_path):
    """Pythia's config.json (transformers 4) says rotary_pct and rotary_emb_base, not rope_parameters."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(cases["pythia"].folder, tmp_path / "legacy")
    config = json.loads((folder / "config.json").read_text())
    del config["rope_parameters"]
    (folder / "config.json").write_text(json.dumps({**config, "rotary_pct": 0.5, "rotary_emb_base": 500}))
    model = load_model(ModelConfig(name=None, path=str(folder)))
    assert model.cfg.rope == Rope(500.0, 8) and model.cfg.rotary_pct == 0.5
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = cases["pythia"].ids()
    logits, _ = model.forward(ids)
    with torch.no_grad():
        assert max_diff(logits, hf(torch.from_numpy(ids).long()).logits) < ATOL


@pytest.mark.parametrize("change", ["full rotary", "rope base", "sequential", "tanh GELU"])
def test_each_variant_changes_the_logits(cases, change):
    """The parity above tells the variants apart: running Pythia's weights with any one setting
    changed moves its logits by more than ten times the tolerance."""
    case = cases["pythia"]
    cfg = case.model.cfg
    changed = {"full rotary": dict(rope=Rope(10000.0, cfg.head_dim)), "rope base": dict(rope=Rope(100.0, 4)),
               "sequential": dict(parallel_residual=False), "tanh GELU": dict(activation="gelu_new")}[change]
    model = dataclasses.replace(case.model, cfg=dataclasses.replace(cfg, **changed))
    ids = case.ids()
    logits, _ = model.forward(ids)
    assert max_diff(logits, hf_logits(case, ids)) > 10 * ATOL


def test_untied_head_is_the_checkpoints_own(cases):
    """Pythia's head is not its embedding: logits, xent and the folded W_U read the head."""
    case = cases["pythia"]
    head_VxD = case.hf.get_output_embeddings().weight.detach().numpy()
    embedding_VxD = case.hf.get_input_embeddings().weight.detach().numpy()
    assert np.abs(head_VxD - embedding_VxD).max() > 0.5
    ids = case.ids()
    logits, _ = case.model.forward(ids)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    xent = -float(jnp.take_along_axis(logprobs[:, :-1], ids[:, 1:, None], axis=-1).mean())
    with torch.no_grad():
        hf_xent = case.hf(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()).loss.item()
    assert abs(xent - hf_xent) < 1e-5
    gain = case.hf.gpt_neox.final_layer_norm.weight.detach().numpy()
    assert max_diff(case.model.folded_unembedding_VxD(), head_VxD * gain) < 1e-6


def test_the_head_is_embed_out_or_lm_head(cases, tmp_path):
    """Checkpoints name the untied head `embed_out.weight` (Pythia's files, and transformers 5 saves
    it so); one written from a transformers 5 state dict calls it `lm_head.weight`."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(cases["pythia"].folder, tmp_path / "lm-head")
    tensors = load_file(folder / "model.safetensors")
    assert "embed_out.weight" in tensors and "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, folder / "model.safetensors")
    model = load_model(ModelConfig(name=None, path=str(folder)))
    ids = cases["pythia"].ids()
    logits, _ = model.forward(ids)
    assert max_diff(logits, hf_logits(cases["pythia"], ids)) < ATOL
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"no tensor 'embed_out.weight'.*\(tie_word_embeddings: false\)"):
        load_model(ModelConfig(name=None, path=str(folder)))


@pytest.mark.parametrize("name", CASES)
def test_transformers_module_names_read_exactly_what_the_module_returns_or_receives(cases, name):
    """Every module name of GPTNeoXLayer as a PyTorch forward hook sees it, with no TransformerLens
    centring; in a parallel block `post_attention_layernorm.input` is the block's input."""
    case = cases[name]
    ids = case.ids()
    hooks = case.hf_hooks()
    caught = hf_module_activations(case.hf, case.hf.gpt_neox.layers, hooks, ids)
    _, acts = case.model.forward(ids, hooks=tuple(hooks), center_writes=True)
    assert set(caught) == set(acts)
    for hook, ref in caught.items():
        assert max_diff(acts[hook], ref) < ATOL, hook


def transformer_lens_model(case: Case, center_writes: bool = True):
    """A HookedTransformer as `from_pretrained` builds it (fold_ln, centred writing weights and
    unembedding, folded value biases), offline: TransformerLens's own config and weight conversion of
    the tiny checkpoint folder."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    cfg = loading.get_pretrained_model_config(str(case.folder), fold_ln=True, device="cpu", dtype=torch.float32)
    cfg.use_hook_mlp_in = True  # what sae-lens sets to train on hook_mlp_in
    state_dict = loading.get_pretrained_state_dict(str(case.folder), cfg, case.hf, dtype=torch.float32)
    tl = HookedTransformer(cfg, move_to_device=False)
    tl.load_and_process_state_dict(state_dict, fold_ln=True, center_writing_weights=center_writes,
                                   center_unembed=True, fold_value_biases=True)
    return tl.eval()


def _tl_cache(tl, ids: np.ndarray):
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.from_numpy(ids).long())
    return cache


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", TL_CASES)
def test_hook_points_match_transformer_lens(cases, name):
    """Every TransformerLens point, as TransformerLens runs the model (its RoPE base is always 10000)
    with centred writing weights; the points are exactly those TransformerLens records (a parallel
    block has no hook_resid_mid)."""
    case = cases[name]
    ids = case.ids()
    cache = _tl_cache(transformer_lens_model(case), ids)
    names = case.model.family.hook_names(case.model.cfg)
    assert set(names.tl_points) - set(TL_ALIASES) == {p for p in BLOCK_POINTS if f"blocks.0.{p}" in cache}
    assert gpt_neox.CENTERS_WRITES_BY_DEFAULT
    model = dataclasses.replace(case.model, cfg=gpt_neox.transformer_lens_config(case.model.cfg))
    _, acts = model.forward(ids, hooks=case.all_hooks(), center_writes=True)
    for hook in case.all_hooks():
        assert max_diff(acts[hook], tl_value(cache, hook)) < ATOL, hook
    if name == "sequential":  # and the config matters: with the checkpoint's base 100 they differ
        _, raw = case.model.forward(ids, hooks=("blocks.1.hook_resid_post",), center_writes=True)
        assert max_diff(raw["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"]) > 100 * ATOL


@pytest.mark.parametrize(("model_class", "center_flag", "hf_hook_name", "expected"), [
    (None, None, None, True),  # sae-lens's default: TransformerLens from_pretrained, writing weights centred
    ("HookedTransformer", True, None, True),
    ("HookedTransformer", False, None, False),  # model_from_pretrained_kwargs: center_writing_weights false
    ("AutoModelForCausalLM", None, None, False),  # trained on the transformers model: the raw residual
    (None, None, "gpt_neox.layers.1.output", False),  # a transformers module name: never processed
])
def test_residual_centring_follows_the_sae(cases, model_class, center_flag, hf_hook_name, expected):
    from epo_tui.engine.pairing import ModelWithSAE

    sae = type("SAE", (), {"model_class_name": model_class, "center_writes": center_flag,
                           "hf_hook_name": hf_hook_name})()
    assert ModelWithSAE(model=cases["pythia"].model, sae=sae).center_writes is expected


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("hook", "center"), [
    ("blocks.1.hook_resid_post", True),
    pytest.param("blocks.0.hook_mlp_out", True, marks=pytest.mark.slow),
    pytest.param("blocks.1.hook_attn_out", False, marks=pytest.mark.slow),
])
def test_a_transformer_lens_sae_reads_what_sae_lens_reads(cases, tmp_path, hook, center):
    """A sae-lens SAE trained on TransformerLens (res-sm, mlp-sm, att-sm hooks), loaded as a user
    would: its latents equal sae-lens's encode of TransformerLens's activations, with writing weights
    centred unless its model_from_pretrained_kwargs say center_writing_weights: false. The
    "sequential" checkpoint's RoPE base (100) is one TransformerLens ignores, so the pairing must
    run the model as TransformerLens does."""
    from sae_lens import SAE

    import search_fixtures as fx
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.sae import activations
    from epo_tui.engine.sae_writer import write_random_sae

    case = cases["sequential"]
    ids = case.ids()
    kwargs = None if center else {"center_writing_weights": False}
    norm = float(np.linalg.norm(np.asarray(case.model.forward(ids, hooks=(hook,))[1][hook]), axis=-1).mean())
    sae_dir = write_random_sae(tmp_path / "sae", d_in=case.model.d_model, d_sae=48, hook_name=hook,
                               model_from_pretrained_kwargs=kwargs, input_norm=norm)
    pair = load_model_with_sae(fx.make_config(case.folder, sae_dir))
    assert pair.center_writes is center
    _, sae_in = pair.forward(ids, logits=False)
    tl_in = _tl_cache(transformer_lens_model(case, center_writes=center), ids)[hook]
    assert max_diff(sae_in, tl_in) < ATOL
    reference = SAE.load_from_disk(str(sae_dir), device="cpu")
    with torch.no_grad():
        expected = reference.encode(tl_in).numpy()
    latents = np.asarray(activations(pair.sae, sae_in))
    assert (expected > 0).mean() > 0.05 and max_diff(latents, expected) < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_logits_close_to_float32(cases, name):
    check_bfloat16_close_to_float32(cases[name])


@pytest.mark.parametrize("name", ["pythia", pytest.param("sequential", marks=pytest.mark.slow)])
def test_a_prefix_computed_once_gives_the_same_logits_and_hooks(cases, name):
    """Keys/values of a fixed prefix, reused for a batch of continuations (their rotary positions
    continue after it), give what the whole sequence gives in one pass."""
    case = cases[name]
    check_prefix_computed_once(case, case.all_hooks() + tuple(case.hf_hooks()), center_writes=True)


@pytest.mark.parametrize("name", ["pythia", "sequential"])
def test_without_logits_stops_after_the_last_layer_it_needs(cases, name):
    from epo_tui.engine.models.hooks import HookRecorder
    from epo_tui.engine.models.layers import forward_of

    case = cases[name]
    ids = case.ids()
    hook = "blocks.0.hook_resid_post"
    ran = []
    forward = forward_of(lambda *args: ran.append(args[3]) or gpt_neox._block(*args))  # gpt_neox.forward, spied
    rec = HookRecorder((hook,), case.n_layers, gpt_neox.hook_names(case.model.cfg))
    params, cfg = case.model.params, case.model.cfg
    assert forward(params, cfg, gpt_neox.embed(params, cfg, ids), rec, all_layers=False) is None
    assert ran == [0] and set(rec.out) == {hook}
    _, full = case.model.forward(ids, hooks=(hook,))
    assert max_diff(rec.out[hook], full[hook]) < ATOL


@pytest.mark.parametrize("name", CASES)
def test_onehot_input_matches_ids(cases, name):
    check_one_hot_input_matches_ids(cases[name])


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the config key and what is supported, exit code 2


@pytest.mark.parametrize(("change", "needles"), [
    (dict(hidden_act="quick_gelu"), ("hidden_act 'quick_gelu' is not supported", "gelu, gelu_new")),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0,
                           "partial_rotary_factor": 0.25}), ("rope_type 'dynamic' is not supported", "llama3")),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.3125}),
     ("partial_rotary_factor 0.3125 rotates 5 of its 16 head dims", "supported: an even number")),
    (dict(num_attention_heads=0), ("cannot read the config", "integer modulo by zero")),  # transformers' own check
    (dict(attention_bias=True, drop="gpt_neox.layers.0.attention.dense.bias"),
     ("no tensor 'gpt_neox.layers.0.attention.dense.bias'", "(attention_bias: true)")),
])
def test_unsupported_variants_are_refused_in_one_line(cases, tmp_path, change, needles):
    import shutil

    from cli_run import run_cli
    from refusals import assert_refused, edit_checkpoint

    from epo_tui.engine.sae_writer import write_random_sae

    change = dict(change)
    folder = edit_checkpoint(shutil.copytree(cases["pythia"].folder, tmp_path / "model"),
                             drop=change.pop("drop", None), **change)
    sae = write_random_sae(tmp_path / "sae", d_in=32, d_sae=16, hook_name="blocks.1.hook_resid_pre")
    config = tmp_path / "pair.toml"
    config.write_text(f'[model]\npath = "{folder}"\n[sae]\npath = "{sae}"\n[feature]\nindex = 0\n')
    code, out, err = run_cli("score", "--config", config, "hello")
    assert_refused(code, out, err, *needles)


def test_an_sae_on_resid_mid_of_a_parallel_block_is_refused(cases):
    """A parallel block has no resid_mid (TransformerLens records none): the error lists what it has."""
    with pytest.raises(UserError, match=r"unknown hook point 'hook_resid_mid'.*this model has: hook_resid_pre"):
        cases["pythia"].model.hook_point("blocks.1.hook_resid_mid")
    assert cases["sequential"].model.hook_point("blocks.1.hook_resid_mid").point == "hook_resid_mid"


# ----------------------------------------------------------------------------------------------
# A short EPO search


@pytest.mark.slow
def test_a_short_search_beats_its_starting_elites_and_reports_the_plain_forward(tmp_path):
    """On `python -m epo_tui.engine.tiny DIR --family gpt_neox`: a few iterations find a prompt
    above every starting elite, and the reported act and xent are a plain forward pass's."""
    from search_fixtures import independent_numbers

    from epo_tui.config import load_config
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.search import Search
    from epo_tui.engine.tiny import main as write_tiny

    assert write_tiny([str(tmp_path), "--family", FAMILY]) == 0
    config = load_config(str(tmp_path / "config.toml"))
    pair = load_model_with_sae(config)
    assert pair.model.model_type == FAMILY and pair.center_writes
    search = Search(pair, config)
    state = search.initial_state()
    start = float(np.max(state.objective_K))
    for _ in range(8):
        state, _ = search.step(state)
    assert float(np.max(state.objective_K)) > start
    objective, act, xent, *_ = independent_numbers(pair, search, state.tokens_KxN)
    np.testing.assert_allclose(state.objective_K, objective, atol=1e-4, rtol=0)
    np.testing.assert_allclose(state.act_K, act, atol=1e-4, rtol=0)
    np.testing.assert_allclose(state.xent_K, xent, atol=1e-4, rtol=0)

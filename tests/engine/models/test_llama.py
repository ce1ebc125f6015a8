"""The Llama-style family (models/llama.py: llama, mistral, qwen2, qwen3, qwen3_moe) against PyTorch:
transformers for logits and module outputs, TransformerLens for every hook point where TL runs the
architecture, and a short EPO search on a tiny Llama.

Each tiny checkpoint is built with the model type's own transformers config class (tiny.py), with
initializer_range 0.3 so a wrong RoPE, scale or mask moves logits by far more than 1e-4, and random
norms and biases. Each case turns on what its family adds: GQA everywhere; Llama with `llama3` RoPE
scaling (original context 16, so every frequency is slowed or smoothed) and an untied head; Llama with
attention and MLP biases, `linear` RoPE and head_dim != d_model / heads; Mistral with a sliding
window of 4 on the 12-token texts; Qwen 2 with q/k/v biases (TL's hook_z folds b_V away), and again
with its upper layer sliding; Qwen 3 with q/k norms, head_dim 12 and a tied head, and again with attention biases
and a sliding first layer from `layer_types`; Qwen 3 MoE with 4 experts, top 2, renormalised, and a
dense first layer (`mlp_only_layers`).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from epo_tui.config import ModelConfig
from epo_tui.engine.language_model import load_model
from epo_tui.engine.models import llama
from epo_tui.engine.tiny import write_tiny_checkpoint
from epo_tui.errors import UserError
from family_parity import (ATOL, SEQ_LEN, Case, check_bfloat16_close_to_float32, check_one_hot_input_matches_ids,
                           check_prefix_computed_once, check_without_logits_stops_early, hf_module_activations,
                           max_diff, tl_value)

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
SLIDING = dict(use_sliding_window=True, sliding_window=4)
# name: (model_type, config overrides)
CASES = {
    "llama": ("llama", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=12,
                                   rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=4.0))),
    "mistral": ("mistral", dict(sliding_window=4, head_dim=12)),
    "qwen2": ("qwen2", dict()),
    "qwen2-sliding": ("qwen2", dict(**SLIDING, max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=12, tie_word_embeddings=True)),  # as Qwen3-0.6B ... 4B
    "qwen3-sliding-biases": ("qwen3", dict(**SLIDING, head_dim=12, attention_bias=True,
                                           layer_types=["sliding_attention", "full_attention"])),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=12, mlp_only_layers=[0])),
}


def _fast(*names: str) -> list:
    """Every case, the ones not named marked slow (to keep this file's fast part short)."""
    return [name if name in names else pytest.param(name, marks=pytest.mark.slow) for name in CASES]


# TransformerLens runs these as transformers does (its Llama ignores an explicit head_dim and biases,
# its Qwen 2 ignores sliding windows, and it has no Qwen 3 MoE)
TL_CASES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    # folder names without "llama"/"gemma": TransformerLens picks an architecture from those words
    root = tmp_path_factory.mktemp("family")
    out = {}
    for i, (name, (model_type, overrides)) in enumerate(CASES.items()):
        folder = write_tiny_checkpoint(root / f"case{i}", model_type, seed=1, initializer_range=0.3, **overrides)
        out[name] = Case(folder, model_type)
    return out


def hf_logits(case: Case, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return case.hf(torch.from_numpy(ids).long()).logits.numpy()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_float32_logits_match_transformers(cases, name, batch):
    case = cases[name]
    ids = case.ids(batch)
    logits, _ = case.model.forward(ids)
    assert logits.dtype == jnp.float32
    assert max_diff(logits, hf_logits(case, ids)) < ATOL


def test_each_case_runs_the_variant_it_names(cases):
    """The configs are read as intended, and each variant changes the logits: the same weights without
    it are far from transformers (so the parity above tests it)."""
    cfgs = {name: case.model.cfg for name, case in cases.items()}
    assert all(c.n_kv_heads == 2 and c.n_heads == 4 for c in cfgs.values())
    assert cfgs["llama"].rope.scaling == ("llama3", 8.0, 1.0, 4.0, 16.0)
    assert cfgs["llama-biases"].rope.scaling == ("linear", 4.0)
    assert (cfgs["llama-biases"].qkv_bias, cfgs["llama-biases"].o_bias, cfgs["llama-biases"].mlp_bias) == (True,) * 3
    assert cfgs["llama-biases"].head_dim == 12 and cfgs["qwen3"].head_dim == 12
    assert cfgs["mistral"].sliding_layers == (True, True) and cfgs["mistral"].sliding_window == 4
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias and cfgs["qwen2"].sliding_window is None
    assert cfgs["qwen2-sliding"].sliding_layers == (False, True)
    assert cfgs["qwen3"].qk_norm and not cfgs["qwen3"].qkv_bias
    assert cfgs["qwen3-sliding-biases"].sliding_layers == (True, False) and cfgs["qwen3-sliding-biases"].o_bias
    assert cfgs["qwen3_moe"].moe_layers == (False, True)
    assert (cfgs["qwen3_moe"].n_experts, cfgs["qwen3_moe"].experts_per_token) == (4, 2)
    assert cfgs["qwen3_moe"].norm_topk_prob

    def off(name, **changes):
        case = cases[name]
        model = dataclasses.replace(case.model, cfg=dataclasses.replace(case.model.cfg, **changes))
        ids = case.ids()
        return max_diff(model.forward(ids)[0], hf_logits(case, ids))

    assert off("llama", rope=dataclasses.replace(cfgs["llama"].rope, scaling=("default",))) > 100 * ATOL
    assert off("llama-biases", rope=dataclasses.replace(cfgs["llama-biases"].rope, scaling=("default",))) > 100 * ATOL
    for name in ("mistral", "qwen2-sliding", "qwen3-sliding-biases"):
        assert off(name, sliding_layers=(False, False)) > 100 * ATOL, name
    assert off("qwen3_moe", norm_topk_prob=False) > 100 * ATOL


def test_untied_head_matches_transformers(cases):
    """Llama 3 8B unties its head (Qwen3-0.6B ties it): logits, xent and the folded W_U use lm_head,
    not the embedding."""
    case = cases["llama"]
    ids = case.ids()
    head_VxD = case.hf.get_output_embeddings().weight.detach().numpy()
    embedding_VxD = case.hf.get_input_embeddings().weight.detach().numpy()
    assert np.abs(head_VxD - embedding_VxD).max() > 0.5
    assert "unembed_VxD" in case.model.params and "unembed_VxD" not in cases["qwen3"].model.params
    logits, _ = case.model.forward(ids)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    xent = -float(jnp.take_along_axis(logprobs[:, :-1], ids[:, 1:, None], axis=-1).mean())
    with torch.no_grad():
        hf_xent = case.hf(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()).loss.item()
    assert abs(xent - hf_xent) < 1e-5
    gain_D = case.hf.model.norm.weight.detach().numpy()
    assert max_diff(case.model.folded_unembedding_VxD(), head_VxD * gain_D) < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_transformers_module_names_read_exactly_what_the_module_returns_or_receives(cases, name):
    case = cases[name]
    ids = case.ids()
    hooks = case.hf_hooks()
    caught = hf_module_activations(case.hf, case.hf.model.layers, hooks, ids)
    _, acts = case.model.forward(ids, hooks=tuple(hooks))
    assert set(caught) == set(acts)
    for hook, ref in caught.items():
        assert max_diff(acts[hook], ref) < ATOL, hook


def _transformer_lens_model(case: Case, monkeypatch):
    """A HookedTransformer configured by TransformerLens itself from the checkpoint folder (offline:
    a local folder name), loaded from the tiny HF model and processed as `from_pretrained` does
    (fold_ln, fold_value_biases; TL skips centring for RMSNorm models)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    monkeypatch.chdir(case.folder.parent)  # a relative name: TL reads architecture words in the path
    name = case.folder.name
    cfg = get_pretrained_model_config(name, fold_ln=True, device="cpu", dtype=torch.float32)
    cfg.use_hook_mlp_in = True
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(get_pretrained_state_dict(name, cfg, case.hf), fold_ln=True,
                                   center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    return tl.eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("name", TL_CASES)
def test_hook_points_match_transformer_lens(cases, name, monkeypatch):
    """Every TransformerLens point of every layer, as from_pretrained's TL computes it (the raw
    residual: TL cannot centre RMSNorm models; hook_z without Qwen 2's value biases)."""
    case = cases[name]
    ids = case.ids()
    tl = _transformer_lens_model(case, monkeypatch)
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.from_numpy(ids).long())
    assert llama.CENTERS_WRITES_BY_DEFAULT is False
    _, acts = case.model.forward(ids, hooks=case.all_hooks(), center_writes=llama.CENTERS_WRITES_BY_DEFAULT)
    for hook in case.all_hooks():
        assert max_diff(acts[hook], tl_value(cache, hook)) < ATOL, hook
    if name == "qwen2":  # and hook_z differs from o_proj's input by exactly the value bias
        _, raw = case.model.forward(ids, hooks=("model.layers.0.self_attn.o_proj.input",))
        b_v_GxK = case.hf.model.layers[0].self_attn.v_proj.bias.detach().numpy().reshape(2, -1)
        z_BxLxHxK = np.asarray(acts["blocks.0.attn.hook_z"]).reshape(2, SEQ_LEN, 4, -1)
        expected = z_BxLxHxK + np.repeat(b_v_GxK, 2, axis=0)  # query heads 0, 1 read key-value head 0
        assert max_diff(raw["model.layers.0.self_attn.o_proj.input"], expected.reshape(2, SEQ_LEN, -1)) < ATOL


@pytest.mark.parametrize("name", _fast("qwen3-sliding-biases", "qwen3_moe"))
def test_bfloat16_logits_close_to_float32(cases, name):
    check_bfloat16_close_to_float32(cases[name], top_token_agreement=None)


@pytest.mark.parametrize("name", _fast("mistral", "qwen3-sliding-biases"))
def test_a_prefix_computed_once_gives_the_same_logits_and_hooks(cases, name):
    """A 7-token prefix (longer than the sliding windows) reused for a batch of continuations gives
    what the whole sequence gives in one pass, at every hook."""
    case = cases[name]
    check_prefix_computed_once(case, case.all_hooks() + tuple(case.hf_hooks()))


@pytest.mark.parametrize("name", _fast("qwen3_moe"))
def test_without_logits_stops_early_and_one_hot_input_equals_ids(cases, name):
    check_without_logits_stops_early(cases[name], "blocks.0.hook_resid_post")
    check_one_hot_input_matches_ids(cases[name])


def test_moe_layers_have_no_dense_mlp_points(cases):
    names = llama.hook_names(cases["qwen3_moe"].model.cfg)
    assert "mlp.hook_pre" not in names.tl_points and "hook_mlp_out" in names.tl_points
    with pytest.raises(UserError, match="unknown hook point 'mlp.hook_post'"):
        cases["qwen3_moe"].model.hook_point("blocks.0.mlp.hook_post")
    assert "mlp.hook_pre" in llama.hook_names(cases["qwen3"].model.cfg).tl_points


def test_moe_reads_fused_experts_too(cases, tmp_path):
    """A checkpoint holding `mlp.experts.gate_up_proj` (E x 2F x D: gate rows, then up rows) and
    `mlp.experts.down_proj` instead of one tensor per expert gives the same model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    case = cases["qwen3_moe"]
    folder = tmp_path / "fused"
    shutil.copytree(case.folder, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    prefix, E = "model.layers.1.mlp.experts.", case.model.cfg.n_experts
    per_expert = {name: np.stack([tensors.pop(f"{prefix}{e}.{name}.weight") for e in range(E)])
                  for name in ("gate_proj", "up_proj", "down_proj")}
    tensors[prefix + "gate_up_proj"] = np.concatenate([per_expert["gate_proj"], per_expert["up_proj"]], axis=1)
    tensors[prefix + "down_proj"] = per_expert["down_proj"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    fused = load_model(ModelConfig(name=None, path=str(folder)))
    ids = case.ids()
    assert max_diff(fused.forward(ids)[0], case.model.forward(ids)[0]) == 0.0


# ----------------------------------------------------------------------------------------------
# What the family cannot run exactly: one line naming the config key and what is supported


@pytest.mark.parametrize("model_type, changes, message", [
    ("llama", dict(hidden_act="gelu"), "Llama with hidden_act 'gelu' is not supported (hidden_act: silu)"),
    ("qwen3", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
     "Qwen3 with rope_type 'yarn' is not supported (supported: default, linear, llama3)"),
    ("mistral", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "Mistral with partial_rotary_factor 0.5 is not supported (1.0)"),
    ("qwen2", dict(layer_types=["chunked_attention", "full_attention"]),
     "Qwen2 with layer_types 'chunked_attention' is not supported (full_attention, sliding_attention)"),
])
def test_unsupported_variants_are_one_line(tmp_path, model_type, changes, message):
    folder = write_tiny_checkpoint(tmp_path / "m", model_type)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(UserError) as err:
        load_model(ModelConfig(name=None, path=str(folder)))
    assert str(err.value) == message


# ----------------------------------------------------------------------------------------------
# A short EPO search on a tiny Llama


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_search_improves_on_its_start_and_reports_the_plain_forward(tmp_path, family):
    """`python -m epo_tui.engine.tiny DIR --family X`, then a search: the best objective rises above
    the starting elites', and the elites' act and xent equal a plain forward pass over the prompt."""
    import search_fixtures as fx
    from epo_tui.config import load_config
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.sae import activations, pre_activations
    from epo_tui.engine.search import Search
    from epo_tui.engine.tiny import main as write_tiny

    assert write_tiny([str(tmp_path), "--family", family]) == 0
    config = load_config(str(tmp_path / "config.toml"))
    pair = load_model_with_sae(config)
    assert pair.model.model_type == family
    search = Search(pair, config)
    state = search.initial_state()
    start = float(state.objective_K.max())
    for _ in range(15):
        state, _ = search.step(state)
    assert float(state.objective_K.max()) > start

    prefix = np.asarray(pair.model.encode("", config.search.prefix))
    full = np.concatenate([np.broadcast_to(prefix, (len(state.tokens_KxN), len(prefix))), state.tokens_KxN], axis=1)
    logits, sae_in = fx.full_forward(pair, full)
    feature = config.feature.index
    np.testing.assert_allclose(state.act_K, np.asarray(activations(pair.sae, sae_in))[:, -1, feature], atol=1e-4)
    np.testing.assert_allclose(state.objective_K, np.asarray(pre_activations(pair.sae, sae_in))[:, -1, feature],
                               atol=1e-4)
    np.testing.assert_allclose(state.xent_K, fx.xent_of(logits, full, state.tokens_KxN.shape[1]), atol=1e-4)


def test_a_tokenizer_without_bos_starts_texts_with_eos(tmp_path):
    """Qwen 2/2.5/3 tokenizers have no BOS token: texts start with EOS, as TransformerLens prepends it
    (and as Qwen Scope's SAEs saw)."""
    from transformers import AutoTokenizer

    folder = write_tiny_checkpoint(tmp_path / "qwen3", "qwen3")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(folder)
    model = load_model(ModelConfig(name=None, path=str(folder)))
    assert model.tokenizer.bos_token_id is None
    eos = model.tokenizer.eos_token_id
    assert model.encode("hello world")[0] == eos and model.encode("hello world")[1:] == model.prompt_ids("hello world")

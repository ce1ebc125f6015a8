"""Our JAX GPT-2 / Gemma / Gemma 2 against PyTorch: transformers for logits and HF module outputs,
TransformerLens for every hook point (the activations sae-lens SAEs are trained on).

The tiny checkpoints are made sensitive to what they test: initializer_range 0.3 so attention is far
from uniform (at 0.02 a wrong RoPE or query scale moves logits by less than 1e-4), Gemma with MQA and a
head_dim that is not d_model / n_heads (as gemma-2b and gemma-7b), Gemma 2 with GQA, a
query_pre_attn_scalar that is not head_dim, and soft-caps small enough to bite. The 12-token sequences
are longer than Gemma 2's sliding window (4), so the sliding mask matters.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from epo_tui.config import ModelConfig
from epo_tui.engine.language_model import load_model, resolve_dtype
from epo_tui.engine.models import family_module
from epo_tui.engine.tiny import write_tiny_checkpoint
from family_parity import (ATOL, Case, check_bfloat16_close_to_float32, check_one_hot_input_matches_ids,
                           check_prefix_computed_once, check_without_logits_stops_early, hf_logits,
                           hf_module_activations, max_diff, tl_value)

CASES = {
    "gpt2": dict(initializer_range=0.3),
    "gemma": dict(initializer_range=0.3, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(initializer_range=0.3, head_dim=12, query_pre_attn_scalar=5,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}
FAMILIES = tuple(CASES)
GEMMAS = ("gemma", "gemma2")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("parity")
    return {family: Case(write_tiny_checkpoint(root / family, family, seed=1, **overrides), family)
            for family, overrides in CASES.items()}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_float32_logits_match_transformers(cases, family, batch):
    case = cases[family]
    ids = case.ids(batch)
    logits, _ = case.model.forward(ids)
    assert logits.dtype == jnp.float32
    assert max_diff(logits, hf_logits(case, ids)) < ATOL


# Unembedding heads as transformers 5 reads them: `tie_word_embeddings: false` with an lm_head.weight of
# its own, and a tied config whose checkpoint still holds a different lm_head.weight (transformers warns
# and keeps both). name: (family, tie_word_embeddings in config.json).
HEADS = {
    "gpt2 untied": ("gpt2", False),
    "gemma2 untied": ("gemma2", False),
    "gpt2 tied config, own lm_head": ("gpt2", True),
}


@pytest.fixture(scope="module")
def head_cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for name, (family, tie) in HEADS.items():
        folder = write_tiny_checkpoint(root / name.replace(" ", "-").replace(",", ""), family, seed=2,
                                       tie_word_embeddings=False, **CASES[family])
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tie}))
        out[name] = Case(folder, family)
    return out


def _final_norm_gain(case: Case) -> np.ndarray:
    if case.family == "gpt2":
        return case.hf.transformer.ln_f.weight.detach().numpy()
    return 1.0 + case.hf.model.norm.weight.detach().numpy()


@pytest.mark.parametrize("name", HEADS)
def test_unembedding_head_matches_transformers(head_cases, name):
    """Logits, xent and the folded W_U the feature list reads all use transformers' head, not the
    token embedding (which here would move the mean xent by 0.2-0.5 and single logits by 5-9)."""
    case = head_cases[name]
    ids = case.ids()
    head_VxD = case.hf.get_output_embeddings().weight.detach().numpy()
    embedding_VxD = case.hf.get_input_embeddings().weight.detach().numpy()
    assert np.abs(head_VxD - embedding_VxD).max() > 0.5  # transformers kept a head of its own
    logits, _ = case.model.forward(ids)
    assert max_diff(logits, hf_logits(case, ids)) < ATOL
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    xent = -float(jnp.take_along_axis(logprobs[:, :-1], ids[:, 1:, None], axis=-1).mean())
    with torch.no_grad():
        hf_xent = case.hf(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()).loss.item()
    assert abs(xent - hf_xent) < 1e-5
    assert max_diff(case.model.folded_unembedding_VxD(), head_VxD * _final_norm_gain(case)) < 1e-6


@pytest.mark.parametrize("family", GEMMAS)
def test_gemma_residual_matches_hf_hidden_states(cases, family):
    """hidden_states[L] is resid_pre of layer L. HF's last hidden state comes after the final norm,
    so resid_post is compared with each decoder layer's output, caught by a forward hook."""
    case = cases[family]
    ids = case.ids()
    outputs = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(
        out[0] if isinstance(out, tuple) else out)) for layer in case.hf.model.layers]
    try:
        with torch.no_grad():
            hidden = case.hf(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    assert len(hidden) == case.n_layers + 1 and len(outputs) == case.n_layers
    _, acts = case.model.forward(ids, hooks=case.all_hooks())
    for layer in range(case.n_layers):
        assert max_diff(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer]) < ATOL
        assert max_diff(acts[f"blocks.{layer}.hook_resid_post"], outputs[layer]) < ATOL




@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_module_names_read_exactly_what_the_module_returns_or_receives(cases, family):
    """An SAE's hf_hook_name (`model.layers.1.self_attn.o_proj.input`) reads the module's activation as a
    PyTorch forward hook sees it: no TransformerLens processing, even where GPT-2 centres by default."""
    case = cases[family]
    ids = case.ids()
    hooks = case.hf_hooks()
    caught = hf_module_activations(case.hf, case.hf.base_model.h if family == "gpt2" else case.hf.model.layers,
                                   hooks, ids)
    _, acts = case.model.forward(ids, hooks=(*hooks, "blocks.1.mlp.hook_in"), center_writes=True)
    assert set(caught) | {"blocks.1.mlp.hook_in"} == set(acts)
    for name, ref in caught.items():
        assert max_diff(acts[name], ref) < ATOL, name
    # TransformerLens's newer name for the MLP's input (mwhanna's transcoders read it)
    prefix = case.model.family.hook_names(case.model.cfg).layer_prefixes[0]
    assert max_diff(acts["blocks.1.mlp.hook_in"], caught[f"{prefix}.1.mlp.input"]) < ATOL


def _transformer_lens_model(case: Case, gemma_act_fn: str = "gelu_pytorch_tanh"):
    """A HookedTransformer built offline from the tiny HF model, processed as `from_pretrained` does
    (fold_ln, center_writing_weights, center_unembed; TL skips centring for RMSNorm models)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights, convert_gpt2_weights

    c = case.hf.config
    common = dict(n_layers=case.n_layers, d_vocab=c.vocab_size, default_prepend_bos=False,
                  dtype=torch.float32, device="cpu", use_hook_mlp_in=True)
    if case.family == "gpt2":
        cfg = HookedTransformerConfig(
            **common, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
            d_mlp=c.n_inner or 4 * c.n_embd, n_ctx=c.n_positions, eps=c.layer_norm_epsilon,
            act_fn=c.activation_function, normalization_type="LN", positional_embedding_type="standard",
            original_architecture="GPT2LMHeadModel")
        convert = convert_gpt2_weights
    else:
        extra = {}
        if case.family == "gemma2":
            extra = dict(
                attn_scale=c.query_pre_attn_scalar**0.5, window_size=c.sliding_window, use_local_attn=True,
                attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
                attn_scores_soft_cap=c.attn_logit_softcapping, output_logits_soft_cap=c.final_logit_softcapping,
                use_normalization_before_and_after=True)
        # TL's own gemma-2b/7b configs say act_fn "gelu" (exact); HF runs the tanh approximation.
        cfg = HookedTransformerConfig(
            **common, **extra, d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads,
            n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings,
            eps=c.rms_norm_eps, act_fn=gemma_act_fn, normalization_type="RMS", gated_mlp=True,
            final_rms=True, positional_embedding_type="rotary", rotary_dim=c.head_dim,
            rotary_base=c.rope_parameters["rope_theta"],
            original_architecture="Gemma2ForCausalLM" if case.family == "gemma2" else "GemmaForCausalLM")
        convert = convert_gemma_weights
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert(case.hf, cfg), fold_ln=True, center_writing_weights=True,
                                   center_unembed=True)
    return tl.eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_hook_points_match_transformer_lens(cases, family):
    """Every hook point, with the family's default centring (GPT-2: centred writes, as res-jb SAEs saw;
    Gemma: the raw residual, as TL cannot centre RMSNorm models)."""
    case = cases[family]
    ids = case.ids()
    tl = _transformer_lens_model(case)
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.from_numpy(ids).long())
    center = family_module(family).CENTERS_WRITES_BY_DEFAULT
    assert center == (family == "gpt2")
    _, acts = case.model.forward(ids, hooks=case.all_hooks(), center_writes=center)
    for name in case.all_hooks():
        assert max_diff(acts[name], tl_value(cache, name)) < ATOL, name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("model_class, act_fn", [(None, "gelu"), ("HookedTransformer", "gelu"),
                                                 ("AutoModelForCausalLM", "gelu_pytorch_tanh")])
def test_gemma1_paired_with_a_transformer_lens_sae_runs_as_transformer_lens_does(cases, model_class, act_fn):
    """TransformerLens's Gemma 1 uses exact GELU: SAEs trained on its activations (gemma-2b-res-jb)
    are read with exact GELU; an SAE trained on the transformers model keeps the tanh approximation."""
    import dataclasses

    from epo_tui.engine.pairing import ModelWithSAE, TRANSFORMER_LENS_CLASSES

    case = cases["gemma"]
    ids = case.ids()
    model = case.model
    if model_class in TRANSFORMER_LENS_CLASSES:
        model = dataclasses.replace(model, cfg=model.family.transformer_lens_config(model.cfg))
    assert model.cfg.gelu_approximate == (act_fn != "gelu")
    sae = type("SAE", (), {"model_class_name": model_class, "center_writes": None, "hf_hook_name": None})()
    assert ModelWithSAE(model=model, sae=sae).center_writes is False
    tl = _transformer_lens_model(case, gemma_act_fn=act_fn)
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.from_numpy(ids).long())
    _, acts = model.forward(ids, hooks=case.all_hooks())
    for name in case.all_hooks():
        assert max_diff(acts[name], tl_value(cache, name)) < ATOL, name
    if act_fn == "gelu":  # and the difference is real: the transformers default would not match
        _, tanh_acts = case.model.forward(ids, hooks=("blocks.1.hook_resid_post",))
        assert max_diff(tanh_acts["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"]) > 10 * ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_close_to_float32(cases, family):
    check_bfloat16_close_to_float32(cases[family])


class _Device:
    def __init__(self, platform: str):
        self.platform = platform


@pytest.mark.parametrize(("platform", "expected"), [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")])
def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpus(platform, expected):
    assert resolve_dtype("auto", [_Device(platform)]) == expected
    for named in ("float32", "bfloat16"):
        assert resolve_dtype(named, [_Device(platform)]) == named


def test_auto_dtype_loads_float32_weights_on_this_cpu(cases):
    case = cases["gpt2"]
    model = load_model(ModelConfig(name=None, path=str(case.folder), dtype="auto"))
    assert model.dtype == "float32" and all(a.dtype == jnp.float32 for a in jax.tree.leaves(model.params))


@pytest.mark.parametrize("family", FAMILIES)
def test_without_logits_stops_early_with_same_hook(cases, family):
    check_without_logits_stops_early(cases[family], "blocks.0.hook_resid_post")


@pytest.mark.parametrize("family", FAMILIES)
def test_onehot_input_matches_ids(cases, family):
    check_one_hot_input_matches_ids(cases[family])


@pytest.mark.parametrize("model_class, center_flag, expected", [
    (None, None, True),  # sae-lens default: TransformerLens with centred writing weights
    ("HookedTransformer", True, True),  # gpt2-small-res-jb's registry entry says so explicitly
    ("HookedTransformer", False, False),  # trained with center_writing_weights=False
    ("AutoModelForCausalLM", None, False),  # trained on the transformers model: raw residual
])
def test_gpt2_residual_centring_follows_the_sae(cases, model_class, center_flag, expected):
    from epo_tui.engine.pairing import ModelWithSAE

    sae = type("SAE", (), {"model_class_name": model_class, "center_writes": center_flag,
                                "hf_hook_name": None})()
    assert ModelWithSAE(model=cases["gpt2"].model, sae=sae).center_writes is expected


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefix_computed_once_gives_the_same_logits_and_hooks(cases, family):
    """Keys/values of a fixed prefix (longer than Gemma 2's sliding window), reused for a batch of
    continuations, give what the whole sequence gives in one pass."""
    check_prefix_computed_once(cases[family], cases[family].all_hooks())

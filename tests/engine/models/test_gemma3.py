"""Our JAX Gemma 3 against PyTorch: transformers for logits and every decoder-layer module (the names
Gemma Scope 2 SAEs read), TransformerLens for every hook point, on tiny random checkpoints of both
kinds: text (Gemma3TextConfig, Gemma3ForCausalLM) and multimodal (Gemma3Config with a tiny SigLIP
tower, Gemma3ForConditionalGeneration, of which only the language model is loaded).

The checkpoints are made sensitive to what they test: initializer_range 0.3 and random norms (q/k norms
included); GQA and MQA with a head_dim that is not d_model / n_heads; a query_pre_attn_scalar that is
not head_dim; sliding and global layers with different RoPE bases, linear scaling on the global ones;
and a sliding window of 4 on 12-token texts (and after a 7-token prefix computed once).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import search_fixtures as fx
from epo_tui.config import ModelConfig
from epo_tui.engine.language_model import load_model
from epo_tui.engine.models import gemma3
from epo_tui.engine.models.layers import Rope
from epo_tui.engine.tiny import write_tiny_checkpoint
from epo_tui.errors import UserError
from family_parity import (ATOL, Case, check_bfloat16_close_to_float32, check_one_hot_input_matches_ids,
                           check_prefix_computed_once, check_without_logits_stops_early, hf_logits,
                           hf_module_activations, max_diff, tl_value)

LAYERS3 = dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
CASES = {
    # transformers' Gemma 3 never applies attn_logit_softcapping (nor do we): set, it must change nothing
    "text": ("gemma3_text", dict(initializer_range=0.3, head_dim=12, query_pre_attn_scalar=5,
                                 final_logit_softcapping=3.0, attn_logit_softcapping=2.0, **LAYERS3)),
    "multimodal": ("gemma3", dict(
        initializer_range=0.3, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=12, **LAYERS3,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 2000.0}})),
}
UNTIED = {name: (family, {**overrides, "tie_word_embeddings": False}) for name, (family, overrides) in CASES.items()}


def _layers(case: Case):
    """The transformers model's decoder layers (a multimodal model's are its language model's)."""
    return case.hf.model.language_model.layers if case.family == "gemma3" else case.hf.model.layers


def _text_config(case: Case):
    return case.hf.config.get_text_config()


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("gemma3")
    return {name: Case(write_tiny_checkpoint(root / name, family, seed=1, **overrides), family)
            for name, (family, overrides) in CASES.items()}


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("gemma3-untied")
    return {name: Case(write_tiny_checkpoint(root / name, family, seed=2, **overrides), family)
            for name, (family, overrides) in UNTIED.items()}


# ----------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_float32_logits_match_transformers(cases, name, batch):
    case = cases[name]
    assert type(case.hf).__name__ == ("Gemma3ForConditionalGeneration" if name == "multimodal" else "Gemma3ForCausalLM")
    ids = case.ids(batch)
    logits, _ = case.model.forward(ids)
    assert logits.dtype == jnp.float32
    assert max_diff(logits, hf_logits(case, ids)) < ATOL


def test_config_reads_each_layer_type(cases):
    """Sliding layers get the local RoPE and the window, global ones the scaled global RoPE."""
    cfg = cases["multimodal"].model.cfg
    assert cfg.multimodal and cfg.sliding_layers == (True, False, True) and cfg.sliding_window == 4
    assert cfg.ropes == (Rope(50.0, 16), Rope(2000.0, 16, ("linear", 4.0)), Rope(50.0, 16))
    assert cfg.query_scale == pytest.approx(12**-0.5) and cfg.n_kv_heads == 1
    text = cases["text"].model.cfg
    assert not text.multimodal and text.final_softcap == 3.0 and text.ropes[1].scaling == ("linear", 8.0)


@pytest.mark.parametrize("change", ["sliding_window", "ropes", "q_norm"])
def test_each_feature_moves_the_logits(cases, change):
    """The tiny models are sensitive: without the window, with one RoPE for every layer type, or without
    the q/k norms, the logits move far beyond the tolerance."""
    model = cases["multimodal"].model
    ids = cases["multimodal"].ids()
    if change == "sliding_window":
        cfg, params = dataclasses.replace(model.cfg, sliding_window=None), model.params
    elif change == "ropes":
        cfg, params = dataclasses.replace(model.cfg, ropes=(model.cfg.ropes[0],) * model.n_layers), model.params
    else:
        cfg = model.cfg
        blocks = [{**b, "ln_q_w": jnp.zeros_like(b["ln_q_w"])} for b in model.params["blocks"]]
        params = {**model.params, "blocks": blocks}
    changed = dataclasses.replace(model, cfg=cfg, params=params)
    assert max_diff(changed.forward(ids)[0], model.forward(ids)[0]) > 100 * ATOL


@pytest.mark.parametrize("name", UNTIED)
def test_untied_head_matches_transformers(untied, name):
    """Logits, xent and the folded W_U use lm_head (`language_model.lm_head.weight` in an older multimodal
    checkpoint), not the token embedding."""
    case = untied[name]
    ids = case.ids()
    head_VxD = case.hf.get_output_embeddings().weight.detach().numpy()
    assert np.abs(head_VxD - case.hf.get_input_embeddings().weight.detach().numpy()).max() > 0.5
    assert "unembed_VxD" in case.model.params
    logits, _ = case.model.forward(ids)
    assert max_diff(logits, hf_logits(case, ids)) < ATOL
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    xent = -float(jnp.take_along_axis(logprobs[:, :-1], ids[:, 1:, None], axis=-1).mean())
    with torch.no_grad():
        hf_xent = case.hf(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long()).loss.item()
    assert abs(xent - hf_xent) < 1e-5
    body = case.hf.model.language_model if case.family == "gemma3" else case.hf.model
    gain = 1.0 + body.norm.weight.detach().numpy()
    assert max_diff(case.model.folded_unembedding_VxD(), head_VxD * gain) < 1e-6


def _to_transformers5_layout(key: str) -> str:
    """A multimodal tensor name as transformers 4.52+ saved it (`model.language_model.`, `lm_head.`)."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def test_both_multimodal_layouts_load_the_language_model_only(untied, tmp_path, monkeypatch):
    """Tensors under `model.language_model.` (and `lm_head.weight`) load as those under
    `language_model.model.`; the vision tower's and projector's tensors are never read."""
    from safetensors.torch import load_file, save_file

    import epo_tui.engine.hf_checkpoint as checkpoint

    old = untied["multimodal"]
    folder = shutil.copytree(old.folder, tmp_path / "new-layout")
    tensors = load_file(folder / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in tensors)  # what transformers 5 writes
    save_file({_to_transformers5_layout(k): v for k, v in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    read = []
    real_open = checkpoint.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            inner = self.handle.__enter__()
            return types.SimpleNamespace(keys=inner.keys,
                                         get_tensor=lambda key: read.append(key) or inner.get_tensor(key))

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "safe_open", Spy)
    new = Case(folder, "gemma3")
    assert read and all(k.startswith(("model.language_model.", "lm_head.")) for k in read)
    assert any(k.startswith("model.vision_tower.") for k in load_file(folder / "model.safetensors"))
    ids = old.ids()
    logits, _ = new.model.forward(ids)
    assert max_diff(logits, hf_logits(new, ids)) < ATOL
    assert max_diff(logits, old.model.forward(ids)[0]) == 0.0


def test_old_config_fields_read_as_transformers_reads_them(cases, tmp_path):
    """A config.json as transformers 4 wrote it (rope_theta, rope_local_base_freq, rope_scaling, the
    sliding_window_pattern, no layer_types): the same model as transformers builds from it."""
    folder = shutil.copytree(cases["text"].folder, tmp_path / "old-config")
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        config.pop(key)
    config.update(rope_theta=3000.0, rope_local_base_freq=30.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                  sliding_window_pattern=2)
    (folder / "config.json").write_text(json.dumps(config))
    case = Case(folder, "gemma3_text")
    assert case.model.cfg.ropes == (Rope(30.0, 12), Rope(3000.0, 12, ("linear", 2.0)), Rope(30.0, 12))
    assert case.model.cfg.sliding_layers == (True, False, True)
    ids = case.ids()
    assert max_diff(case.model.forward(ids)[0], hf_logits(case, ids)) < ATOL


def test_old_rope_fields_without_rope_parameters():
    """Our own reading of a config object that has only the older fields (no rope_parameters)."""
    text = types.SimpleNamespace(rope_theta=5e5, rope_local_base_freq=7e3,
                                 rope_scaling={"rope_type": "linear", "factor": 8.0})
    ropes = gemma3._ropes(text, 16, {"sliding_attention", "full_attention"})
    assert ropes == {"full_attention": Rope(5e5, 16, ("linear", 8.0)), "sliding_attention": Rope(7e3, 16)}
    assert gemma3._ropes(types.SimpleNamespace(), 16, {"full_attention", "sliding_attention"}) == {
        "full_attention": Rope(1e6, 16), "sliding_attention": Rope(1e4, 16)}
    pattern = types.SimpleNamespace(sliding_window_pattern=3)
    assert gemma3._layer_types(pattern, 4) == ["sliding_attention", "sliding_attention", "full_attention",
                                               "sliding_attention"]


# ----------------------------------------------------------------------------------------------
# Hooks


@pytest.mark.parametrize("name", CASES)
def test_module_names_read_exactly_what_the_module_returns_or_receives(cases, name):
    """Every Gemma3DecoderLayer module, named as Gemma Scope 2 names it (`model.layers.L...`, which in a
    multimodal checkpoint means its language model's layer L), against PyTorch forward hooks; the
    checkpoint's own prefixes name the same activations."""
    case = cases[name]
    ids = case.ids()
    hooks = case.hf_hooks()
    for gemma_scope_2 in ("output", "self_attn.o_proj.input", "pre_feedforward_layernorm.output",
                          "post_feedforward_layernorm.output"):
        assert f"model.layers.1.{gemma_scope_2}" in hooks
    caught = hf_module_activations(case.hf, _layers(case), hooks, ids)
    _, acts = case.model.forward(ids, hooks=tuple(hooks))
    assert set(caught) == set(acts)
    for hook, ref in caught.items():
        assert max_diff(acts[hook], ref) < ATOL, hook
    aliases = {f"{prefix}.{layer}.{key}": f"model.layers.{layer}.{key}"
               for prefix in gemma3.LAYER_PREFIXES[1:] for layer, key in [(0, "output"), (2, "mlp.down_proj.input")]}
    _, same = case.model.forward(ids, hooks=tuple(aliases))
    for alias, hook in aliases.items():
        assert max_diff(same[alias], acts[hook]) == 0.0, alias


def _transformer_lens_model(case: Case):
    """A HookedTransformer built offline from the tiny HF model as TransformerLens's own Gemma 3 configs
    describe it (per-type RoPE bases, linear scaling on global layers, q/k norms), processed as
    `from_pretrained` does."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    c = _text_config(case)
    full, local = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
    assert local["rope_type"] == "default" and full["rope_type"] in ("default", "linear")
    multimodal = case.family == "gemma3"
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers, d_vocab=c.vocab_size, default_prepend_bos=False, dtype=torch.float32,
        device="cpu", use_hook_mlp_in=True, d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps, act_fn=c.hidden_activation, normalization_type="RMS", gated_mlp=True, final_rms=True,
        positional_embedding_type="rotary", rotary_dim=c.head_dim, rotary_base=full["rope_theta"],
        rotary_base_local=local["rope_theta"], rotary_scaling_factor=full.get("factor", 1.0), use_attn_scale=True,
        attn_scale=c.query_pre_attn_scalar**0.5, use_qk_norm=True, window_size=c.sliding_window, use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
        use_normalization_before_and_after=True,
        output_logits_soft_cap=-1.0 if multimodal else (c.final_logit_softcapping or -1.0),
        original_architecture="Gemma3ForConditionalGeneration" if multimodal else "Gemma3ForCausalLM")
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gemma_weights(case.hf, cfg), fold_ln=True, center_writing_weights=True,
                                   center_unembed=True)
    return tl.eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", CASES)
def test_hook_points_match_transformer_lens(cases, name):
    """Every TransformerLens point of every layer (the raw residual: TL does not centre RMSNorm models)."""
    case = cases[name]
    ids = case.ids()
    tl = _transformer_lens_model(case)
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.from_numpy(ids).long())
    assert gemma3.CENTERS_WRITES_BY_DEFAULT is False
    _, acts = case.model.forward(ids, hooks=case.all_hooks())
    for hook in case.all_hooks():
        assert max_diff(acts[hook], tl_value(cache, hook)) < ATOL, hook


# ----------------------------------------------------------------------------------------------
# bfloat16, early stop, one-hot, prefix


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_logits_close_to_float32(cases, name):
    check_bfloat16_close_to_float32(cases[name])


@pytest.mark.parametrize("name", CASES)
def test_without_logits_stops_early_with_same_hook(cases, name):
    check_without_logits_stops_early(cases[name], "model.layers.0.output")


@pytest.mark.parametrize("name", CASES)
def test_onehot_input_matches_ids(cases, name):
    check_one_hot_input_matches_ids(cases[name])


@pytest.mark.parametrize("name", CASES)
def test_a_prefix_computed_once_gives_the_same_logits_and_hooks(cases, name):
    """A 7-token prefix (longer than the window of 4) computed once, then 5 tokens: the sliding layers'
    window reaches back into the prefix exactly as in one pass over all 12, and as transformers does."""
    case = cases[name]
    ids = case.ids(batch=3)
    ids[:, :7] = ids[0, :7]  # the prefix check's sequences
    assert max_diff(case.model.forward(ids)[0], hf_logits(case, ids)) < ATOL
    check_prefix_computed_once(case, case.all_hooks() + tuple(case.hf_hooks()))


# ----------------------------------------------------------------------------------------------
# Image tokens are special: never proposed, never in a prompt


IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


def test_the_multimodal_checkpoints_image_tokens_are_special(cases):
    model = cases["multimodal"].model
    ids = model.tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS))
    config = cases["multimodal"].hf.config
    assert ids == [config.boi_token_index, config.eoi_token_index, config.image_token_index]
    assert set(ids) <= set(model.special_token_ids().tolist())
    with pytest.raises(UserError, match="special token '<image_soft_token>'"):
        model.prompt_ids("a cat <image_soft_token> here")


@pytest.mark.parametrize("named", ["top level", "extra_special_tokens"])
def test_a_gemma3_style_tokenizer_marks_its_image_tokens_special(tmp_path, named):
    """A tokenizer laid out as Gemma 3's: `<image_soft_token>` added as special, `<start_of_image>` and
    `<end_of_image>` added as plain tokens but named (boi_token, eoi_token, image_token) in
    tokenizer_config.json, as the top level or in extra_special_tokens: all three are special ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from epo_tui.engine.language_model import LanguageModel

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["a picture of a cat on the mat"] * 4, trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in IMAGE_TOKENS[:2]])
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKENS[2], special=True, normalized=False)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    names = dict(zip(("boi_token", "eoi_token", "image_token"), IMAGE_TOKENS))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "tokenizer_class": "GemmaTokenizer",
              **(names if named == "top level" else {"extra_special_tokens": names})}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    model = LanguageModel(name="t", model_type="gemma3", cfg=types.SimpleNamespace(vocab_size=len(loaded) + 64),
                          params={}, tokenizer=loaded, dtype="float32")
    ids = loaded.convert_tokens_to_ids(list(IMAGE_TOKENS))
    assert set(ids) <= set(model.special_token_ids().tolist())
    for token in IMAGE_TOKENS:
        with pytest.raises(UserError, match="special token"):
            model.prompt_ids(f"a cat {token}")


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("change, message", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention: true is not supported"),
    (dict(attention_bias=True), "attention_bias: true is not supported"),
    (dict(hidden_activation="silu"), "hidden_activation 'silu' is not supported"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     "layer_types 'chunked_attention' is not supported"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                           "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10.0}}),
     "rope_type 'yarn' is not supported"),
])
@pytest.mark.parametrize("name", CASES)
def test_an_unsupported_variant_is_one_line_naming_the_key(cases, tmp_path, name, change, message):
    folder = shutil.copytree(cases[name].folder, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    (config["text_config"] if name == "multimodal" else config).update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message) as err:
        load_model(ModelConfig(name=None, path=str(folder)))
    assert "\n" not in str(err.value) and "(supported: " in str(err.value)


def test_a_missing_language_model_tensor_names_the_text_config_key(cases, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(cases["multimodal"].folder, tmp_path / "missing")
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("language_model.model.layers.2.self_attn.q_norm.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"no tensor 'model\.language_model\.layers\.2\.self_attn\.q_norm\.weight'.*"
                                        r"num_hidden_layers: 3"):
        load_model(ModelConfig(name=None, path=str(folder)))


# ----------------------------------------------------------------------------------------------
# A short EPO search on a multimodal checkpoint, with an SAE on a Gemma Scope 2 module name


@pytest.mark.slow
def test_a_short_search_improves_and_reports_what_a_plain_forward_gives(cases, tmp_path):
    """With a chat-like prefix longer than the window: the best elite ends above the starting elites,
    every reported act and xent equals a plain forward pass over BOS + prefix + prompt, and no special
    (image) token is ever proposed."""
    from safetensors.numpy import load_file

    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.sae import activations, pre_activations
    from epo_tui.engine.sae_writer import write_random_sae
    from epo_tui.engine.reporting import elite_reports
    from epo_tui.engine.search import Search

    case = cases["multimodal"]
    hook = "model.layers.1.output"
    _, acts = case.model.forward(case.ids(), hooks=(hook,))
    norm = float(np.linalg.norm(np.asarray(acts[hook]), axis=-1).mean())
    sae_dir = write_random_sae(tmp_path / "sae", d_in=case.model.d_model, d_sae=32, architecture="jumprelu",
                               hook_name="blocks.1.hook_resid_post", seed=3, input_norm=norm)
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg["metadata"]["hf_hook_name"] = hook  # as sae-lens writes Gemma Scope 2's
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    assert load_file(str(sae_dir / "sae_weights.safetensors"))["W_enc"].shape == (case.model.d_model, 32)
    config = fx.make_config(case.folder, sae_dir, 0, elites=4, candidates=16, prompt_tokens=6, topk=32,
                            prefix="<start_of_turn>user\nThe quick")
    pair = load_model_with_sae(config)
    assert pair.sae.read_hook == hook
    search = Search(pair, config)
    assert len(search.prefix_ids) > case.model.cfg.sliding_window
    special = set(case.model.special_token_ids().tolist())
    proposed = []
    evaluate = search.evaluate_children
    search.evaluate_children = lambda tokens, *rest: proposed.append(np.array(tokens)) or evaluate(tokens, *rest)
    start = search.initial_state()
    state = start
    for _ in range(12):
        state, _ = search.step(state)
    assert float(state.objective_K.max()) > float(start.objective_K.max())
    assert proposed and not special & set(np.concatenate(proposed).ravel().tolist())

    prefix = np.asarray(search.prefix_ids)
    full = np.concatenate([np.broadcast_to(prefix, (len(state.tokens_KxN), len(prefix))), state.tokens_KxN], axis=1)
    logits, sae_in = fx.full_forward(pair, full)
    np.testing.assert_allclose(state.act_K, np.asarray(activations(pair.sae, sae_in))[:, -1, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(state.objective_K, np.asarray(pre_activations(pair.sae, sae_in))[:, -1, 0],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(state.xent_K, fx.xent_of(logits, full, state.tokens_KxN.shape[1]), atol=1e-4, rtol=0)
    for k, report in enumerate(elite_reports(search, state)):
        assert report.token_ids == full[k].tolist()
        assert report.act == pytest.approx(float(state.act_K[k]))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3_text", "gemma3"])
def test_the_tiny_helper_writes_a_working_gemma3_setup(tmp_path, family):
    """`python -m epo_tui.engine.tiny DIR --family gemma3` writes a model, SAE and config that load."""
    from epo_tui.config import load_config
    from epo_tui.engine.pairing import load_model_with_sae
    from epo_tui.engine.tiny import main

    assert main([str(tmp_path), "--family", family]) == 0
    pair = load_model_with_sae(load_config(str(tmp_path / "config.toml")))
    assert pair.model.model_type == family and pair.model.cfg.multimodal == (family == "gemma3")
    ids = pair.model.encode("The quick brown fox")
    assert len(ids) > pair.model.cfg.sliding_window
    logits, _ = pair.model.forward(np.asarray([ids], np.int32))
    assert logits.shape == (1, len(ids), pair.model.vocab_size) and bool(jnp.isfinite(logits).all())

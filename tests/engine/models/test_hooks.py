"""The hook rule end to end: an SAE whose config names a transformers module reads exactly that module's
activation (no TransformerLens processing); one that names only a TransformerLens hook reads it as
TransformerLens computes it. And `search.prefix = "chat"`: the chat template's user turn."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from epo_tui.config import ModelConfig, load_config
from epo_tui.engine.language_model import load_model
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.sae import activations
from epo_tui.engine.sae_writer import write_random_sae
from epo_tui.engine.scoring import score_text
from epo_tui.engine.tiny import write_config, write_tiny_checkpoint
from epo_tui.errors import UserError

TEXT = "The quick brown fox jumps over the lazy dog"


def _sae_naming_a_module(folder, hook_name: str, hf_hook_name: str | None):
    """A random sae-lens SAE whose cfg.json metadata names `hf_hook_name` as sae-lens writes it."""
    write_random_sae(folder, d_in=32, d_sae=64, hook_name=hook_name, seed=3, input_norm=0.65)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hf_hook_name"] = hf_hook_name
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_gpt2_sae_naming_a_module_reads_its_raw_output_not_the_centred_residual(tiny_dir, tmp_path):
    """The issue's case: metadata.hf_hook_name = "transformer.h.1.output" on a GPT-2. `score` used to read
    TransformerLens's centred residual (off by up to 2e-2); it must read the block's own output."""
    from transformers import AutoModelForCausalLM

    _sae_naming_a_module(tmp_path / "sae", "blocks.1.hook_resid_post", "transformer.h.1.output")
    shutil.copytree(tiny_dir / "model", tmp_path / "model")
    config = load_config(str(write_config(tmp_path / "config.toml", "model", "sae")))
    pair = load_model_with_sae(config)
    assert not pair.center_writes and pair.sae.read_hook == "transformer.h.1.output"

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    caught = {}
    handle = hf.transformer.h[1].register_forward_hook(lambda _m, _a, out: caught.setdefault(
        "out", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hf(torch.tensor([pair.model.encode(TEXT)]))
    handle.remove()
    expected_LxS = np.asarray(activations(pair.sae, caught["out"][0].numpy()))
    feature = int(expected_LxS.max(axis=0).argmax())
    assert expected_LxS[:, feature].max() > 0.1
    scored = score_text(pair, TEXT, feature)
    assert np.abs(np.asarray(scored["activations"]) - expected_LxS[:, feature]).max() < 1e-5
    # and the difference from the centred read is real
    centred = caught["out"][0].numpy() - caught["out"][0].numpy().mean(-1, keepdims=True)
    assert np.abs(np.asarray(activations(pair.sae, centred)) - expected_LxS).max() > 1e-3


def test_an_sae_naming_a_module_the_model_lacks_is_one_line(tiny_dir, tmp_path):
    sae_dir = _sae_naming_a_module(tmp_path / "sae", "blocks.1.hook_resid_post", "model.layers.1.output")
    shutil.copytree(tiny_dir / "model", tmp_path / "model")
    config = load_config(str(write_config(tmp_path / "config.toml", "model", sae_dir.name)))
    with pytest.raises(UserError, match=r"^sae: unknown hook 'model.layers.1.output' \(hooks look like "
                                        r"'blocks.1.hook_resid_post' or 'transformer.h.1.output'"):
        load_model_with_sae(config)


GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                  "<end_of_turn>\n{% endfor %}")


def test_chat_prefix_is_the_templates_user_turn_without_bos(tmp_path):
    from transformers import AutoTokenizer

    folder = write_tiny_checkpoint(tmp_path / "gemma", "gemma")
    base = load_model(ModelConfig(name=None, path=str(folder)))
    with pytest.raises(UserError, match=r'^search.prefix = "chat" needs a chat template'):
        base.encode("hi", "chat")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = GEMMA_TEMPLATE
    tokenizer.save_pretrained(folder)
    model = load_model(ModelConfig(name=None, path=str(folder)))
    assert model.chat_prefix() == "<start_of_turn>user\n"
    assert model.encode("hi there", "chat") == model.encode("hi there", "<start_of_turn>user\n")
    start_of_turn = model.tokenizer.convert_tokens_to_ids("<start_of_turn>")
    assert model.encode("", "chat")[:2] == [model.tokenizer.bos_token_id, start_of_turn]

"""Finding and reading checkpoints: hub ids through the huggingface_hub cache, local and sharded folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from epo_tui.config import ModelConfig
from epo_tui.engine.language_model import load_model
from epo_tui.engine.tiny import write_tiny_checkpoint
from epo_tui.errors import UserError


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gpt2"), "gpt2", seed=1)


def _logits(model, ids=(0, 5, 9, 17, 33)):
    return np.asarray(model.forward(np.array([ids]))[0])


def _hub_cache() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def test_hub_id_is_read_from_the_huggingface_hub_cache(gpt2_dir):
    # The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/<commit>/files}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = _hub_cache() / "models--tiny-org--tiny-gpt2"
    shutil.copytree(gpt2_dir, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    by_name = load_model(ModelConfig(name="tiny-org/tiny-gpt2"))
    by_path = load_model(ModelConfig(name=None, path=str(gpt2_dir)))
    assert by_name.name == "tiny-org/tiny-gpt2"
    np.testing.assert_array_equal(_logits(by_name), _logits(by_path))


def test_a_hub_id_not_in_the_cache_offline_is_a_clear_error():
    with pytest.raises(UserError) as info:
        load_model(ModelConfig(name="nobody/not-cached"))
    message = str(info.value)
    assert message.startswith("model.name: cannot load 'nobody/not-cached' from the Hugging Face hub")
    assert "HF_HUB_OFFLINE is set" in message and "model.path" in message
    assert "\n" not in message


def test_without_a_network_the_cache_answers_at_once(gpt2_dir, hub_host_unresolvable):
    """huggingface_hub would retry each request for half a minute; an unresolvable host sends it to its
    cache: a cached model loads, a missing one is one line saying why."""
    from epo_tui.engine import hub_access

    with pytest.raises(UserError) as info:
        load_model(ModelConfig(name="nobody/not-cached"))
    assert hub_host_unresolvable.HF_HUB_OFFLINE is True  # cache only, for the rest of this process
    assert hub_access.cache_only_if_unreachable() == "huggingface.co does not resolve"
    assert ("it is not in the local cache and the hub is unreachable: huggingface.co does not resolve"
            in str(info.value)) and "\n" not in str(info.value)
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = _hub_cache() / "models--tiny-org--cached-gpt2"
    shutil.copytree(gpt2_dir, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    np.testing.assert_array_equal(_logits(load_model(ModelConfig(name="tiny-org/cached-gpt2"))),
                                  _logits(load_model(ModelConfig(name=None, path=str(gpt2_dir)))))


def test_behind_a_proxy_an_unresolvable_host_is_left_to_the_proxy(hub_host_unresolvable, monkeypatch):
    from epo_tui.engine import hub_access

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # it resolves the hub, not this machine
    assert hub_access.cache_only_if_unreachable() is None and hub_host_unresolvable.HF_HUB_OFFLINE is False


def test_sharded_checkpoint_reads_like_a_single_file(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(gpt2_dir).save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gpt2_dir / name, sharded / name)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    np.testing.assert_array_equal(_logits(load_model(ModelConfig(name=None, path=str(sharded)))),
                                  _logits(load_model(ModelConfig(name=None, path=str(gpt2_dir)))))


def test_a_folder_without_config_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="model.path: '.*' is not a checkpoint folder"):
        load_model(ModelConfig(name=None, path=str(tmp_path)))


def test_a_folder_without_safetensors_is_refused(gpt2_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(gpt2_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="holds no .safetensors weights"):
        load_model(ModelConfig(name=None, path=str(folder)))


def test_an_unsupported_model_type_is_named(gpt2_dir, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(gpt2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(UserError, match="config.json's model_type 'bert' is not supported"):
        load_model(ModelConfig(name=None, path=str(folder)))

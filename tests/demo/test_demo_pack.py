"""The bundled demo pack: its files, its size, that the engine reads it through the ordinary paths
(transformers config and tokenizer from the folder, sae-lens `load_from_disk`) with the same numbers
as the reference libraries, and `--demo` on every command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from epo_tui import paths
from epo_tui.config import load_config
from epo_tui.labels import read_explanations
from cli_run import run_cli

PACK = paths.demo_pack()
pytestmark = pytest.mark.skipif(not (PACK / "config.toml").is_file(), reason="the demo pack is not built")


@pytest.fixture(scope="module")
def demo_config():
    return load_config(str(paths.demo_config_file()))


@pytest.fixture(scope="module")
def demo_pair(demo_config):
    from epo_tui.engine.pairing import load_model_with_sae

    return load_model_with_sae(demo_config)


def test_pack_files_size_and_notice():
    files = {str(p.relative_to(PACK)): p.stat().st_size for p in PACK.rglob("*") if p.is_file()}
    for name in ("config.toml", "NOTICE.md", "heldout.jsonl", "explanations.jsonl", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json", "sae/cfg.json", "sae/sae_weights.safetensors",
                 "sae/sparsity.safetensors"):
        assert name in files, name
    assert sum(files.values()) <= 25_000_000
    assert not any(name.endswith((".pt", ".pth", ".bin", ".pkl")) for name in files)  # safetensors only
    notice = (PACK / "NOTICE.md").read_text()
    assert "Python Software Foundation" in notice and "CC BY-SA 3.0" in notice


def test_config_points_inside_the_pack(demo_config):
    assert demo_config.model.path == str(PACK / "model")
    assert demo_config.sae.path == str(PACK / "sae")
    assert demo_config.sae.labels == str(PACK / "explanations.jsonl")


def test_labels_cover_every_latent_and_are_marked_automatic(demo_pair):
    lines = [json.loads(line) for line in (PACK / "explanations.jsonl").read_text().splitlines() if line]
    assert [int(r["index"]) for r in lines] == list(range(demo_pair.sae.d_sae))
    assert all(r["automatic"] is True and r["description"] for r in lines)
    assert read_explanations(PACK / "explanations.jsonl")[0] == lines[0]["description"]


def test_labels_are_checked_against_the_demo_saes_neuronpedia_id(demo_config, demo_pair):
    from epo_tui.features import config_labels

    assert demo_pair.sae.neuronpedia_id == "epo-tui-demo-gpt2/2-res-demo"
    imported = config_labels(demo_config.sae.labels, demo_pair.sae)
    assert len(imported.labels) == demo_pair.sae.d_sae and imported.notes == ()  # checked: nothing to say


def test_model_matches_transformers_and_sae_matches_sae_lens(demo_pair):
    import torch
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epo_tui.engine.pairing import as_batch
    from epo_tui.engine.sae import activations

    text = "The function returns a list of the files in the directory."
    ids = demo_pair.model.encode(text)
    assert AutoTokenizer.from_pretrained(PACK / "model")(text)["input_ids"] == ids[1:]
    logits, _ = demo_pair.model.forward(as_batch(ids))
    reference = AutoModelForCausalLM.from_pretrained(PACK / "model")
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), theirs, atol=1e-4)

    _, sae_in = demo_pair.forward(as_batch(ids), logits=False)
    sae = SAE.load_from_disk(PACK / "sae", device="cpu", dtype="float32")
    with torch.no_grad():
        expected = sae.encode(torch.from_numpy(np.array(sae_in[0]))).numpy()
    np.testing.assert_allclose(np.asarray(activations(demo_pair.sae, sae_in[0])), expected, atol=1e-4)


def test_heldout_sample_is_not_in_the_training_labels():
    heldout = [json.loads(line) for line in (PACK / "heldout.jsonl").read_text().splitlines() if line]
    assert len(heldout) > 10 and all(r["text"] and r["name"] for r in heldout)


def test_score_and_features_with_demo(demo_config):
    code, out, err = run_cli("score", "--demo", "--json", "A module is a file containing Python definitions.")
    assert code == 0, err
    scored = json.loads(out)
    assert scored["tokens"][0] == "<|endoftext|>" and len(scored["activations"]) == len(scored["tokens"])
    code, out, err = run_cli("features", "--demo", "--limit", 3, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    labels = read_explanations(PACK / "explanations.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2] and all(r["label"] == labels[r["index"]] for r in rows)


def test_run_and_batch_with_demo(tmp_path):
    code, out, err = run_cli("run", "--demo", "--iterations", 2, "--out", tmp_path / "run")
    assert code == 0, err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["sae"]["hook"] == "blocks.2.hook_resid_pre" and result["timings"]["iterations_run"] == 2
    code, out, err = run_cli("batch", "--demo", "--features", "3,4", "--iterations", 1, "--out", tmp_path / "b")
    assert code == 0, err
    assert [e["feature"] for e in json.loads((tmp_path / "b" / "index.json").read_text())["features"]] \
        in ([3, 4], [4, 3])


@pytest.mark.slow
def test_bench_with_demo_times_the_pack():
    code, out, err = run_cli("bench", "--demo", "--iterations", 2, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [s["name"] for s in report["setups"]] == ["config"]
    assert report["setups"][0]["model"]["layers"] == 4

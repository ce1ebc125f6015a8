"""Every shipped sample config of a new family loads offline, as a user's would once the hub has filled the
huggingface_hub cache: a tiny random checkpoint of the sample's family under the sample's hub id, and an SAE
laid out as the sample's release keeps it on the hub, each loaded by the real code (hub id, registry
loader, our cache). Then `score` runs on them and reads the hook the sample's SAE names."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from epo_tui.config import load_config
from epo_tui.engine.pairing import load_model_with_sae
from epo_tui.engine.sae_writer import write_random_sae
from epo_tui.engine.scoring import score_text
from epo_tui.engine.tiny import write_tiny_checkpoint

D_SAE = 64
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
              "<end_of_turn>\n{% endfor %}")


def in_hub_cache(folder: Path, repo_id: str, subfolder: str = "") -> None:
    """`folder` where huggingface_hub keeps `repo_id` (models--ORG--NAME/snapshots/<commit>/<subfolder>)."""
    repo = Path(os.environ["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / COMMIT / subfolder, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def tiny_model_in_cache(tmp_path: Path, family: str, repo_id: str, layers: int, chat: bool = False) -> None:
    # Gemma 3's pattern: five sliding layers, then a global one
    extra = ({"layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]}
             if family.startswith("gemma3") else {})
    folder = write_tiny_checkpoint(tmp_path / "model", family, num_hidden_layers=layers, **extra)
    if chat:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = GEMMA_CHAT
        tokenizer.save_pretrained(folder)
    in_hub_cache(folder, repo_id)


def gemma_scope_2_in_cache(tmp_path: Path, repo_id: str, subfolder: str, config: dict, d_out: int = 32) -> None:
    """Gemma Scope 2's layout: <subfolder>/config.json and params.safetensors (w_enc is d_in x d_sae)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "gs2"
    folder.mkdir()
    save_file({"w_enc": rng.normal(size=(32, D_SAE)).astype(np.float32) / 2,
               "w_dec": rng.normal(size=(D_SAE, d_out)).astype(np.float32),
               "b_enc": np.zeros(D_SAE, np.float32), "b_dec": np.zeros(d_out, np.float32),
               "threshold": np.full(D_SAE, 0.1, np.float32)}, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    in_hub_cache(folder, repo_id, subfolder)


def scored(sample: str) -> tuple:
    pair = load_model_with_sae(load_config(f"sample:{sample}"))
    config = load_config(f"sample:{sample}")
    result = score_text(pair, "The quick brown fox", config.feature.index, prefix=config.search.prefix)
    assert len(result["activations"]) == len(result["tokens"]) and np.isfinite(result["xent"][1:]).all()
    return pair, result


def test_gemma_3_1b_pt_with_a_gemma_scope_2_residual_sae(tmp_path):
    tiny_model_in_cache(tmp_path, "gemma3_text", "google/gemma-3-1b-pt", layers=14)
    gemma_scope_2_in_cache(tmp_path, "google/gemma-scope-2-1b-pt", "resid_post/layer_13_width_16k_l0_medium",
                           {"architecture": "jump_relu", "model_name": "gemma-v3-1b-pt",
                            "hf_hook_point_in": "model.layers.13.output"})
    pair, _ = scored("gemma-3-1b-pt-gemma-scope-2")
    assert pair.model.model_type == "gemma3_text" and pair.model.n_layers == 14
    assert (pair.sae.read_hook, pair.sae.kind) == ("model.layers.13.output", "sae")
    assert pair.sae.neuronpedia_id == "gemma-3-1b/13-gemmascope-2-res-16k"


def test_gemma_3_1b_it_with_a_transcoder_and_the_chat_prefix(tmp_path):
    tiny_model_in_cache(tmp_path, "gemma3_text", "google/gemma-3-1b-it", layers=14, chat=True)
    gemma_scope_2_in_cache(tmp_path, "google/gemma-scope-2-1b-it", "transcoder/layer_13_width_16k_l0_medium",
                           {"architecture": "jump_relu", "model_name": "gemma-v3-1b-it", "affine_connection": False,
                            "hf_hook_point_in": "model.layers.13.pre_feedforward_layernorm.output",
                            "hf_hook_point_out": "model.layers.13.post_feedforward_layernorm.output"})
    pair, result = scored("gemma-3-1b-it-transcoder")
    assert (pair.sae.kind, pair.sae.read_hook) == ("transcoder", "model.layers.13.pre_feedforward_layernorm.output")
    assert pair.sae.write_hook == "model.layers.13.post_feedforward_layernorm.output"
    # BOS, then the chat template's user turn, then the text
    assert result["tokens"][:2] == ["<bos>", "<start_of_turn>"]
    assert result["prompt_start"] == len(pair.model.encode("", "<start_of_turn>user\n"))


def test_pythia_70m_deduped_with_res_sm(tmp_path):
    tiny_model_in_cache(tmp_path, "gpt_neox", "EleutherAI/pythia-70m-deduped", layers=4)
    sae = write_random_sae(tmp_path / "sae", 32, D_SAE, "blocks.3.hook_resid_post", seed=2)
    in_hub_cache(sae, "ctigges/pythia-70m-deduped__res-sm_processed", "3-res-sm")
    pair, _ = scored("pythia-70m-deduped-res-sm")
    assert pair.model.model_type == "gpt_neox"
    assert pair.sae.read_hook == "blocks.3.hook_resid_post" and pair.center_writes  # as TransformerLens ran it
    assert pair.sae.neuronpedia_id == "pythia-70m-deduped/3-res-sm"


def test_llama_3_1_8b_with_llama_scope(tmp_path):
    tiny_model_in_cache(tmp_path, "llama", "meta-llama/Llama-3.1-8B", layers=16)
    # Llama Scope's layout: <folder>/hyperparams.json and <folder>/checkpoints/final.safetensors
    rng = np.random.default_rng(0)
    folder = tmp_path / "llama-scope"
    (folder / "checkpoints").mkdir(parents=True)
    weights = {"encoder.weight": rng.normal(size=(D_SAE, 32)), "encoder.bias": np.zeros(D_SAE),
               "decoder.weight": rng.normal(size=(32, D_SAE)), "decoder.bias": np.zeros(32)}
    save_file({k: v.astype(np.float32) for k, v in weights.items()}, folder / "checkpoints" / "final.safetensors")
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": 32, "d_sae": D_SAE, "hook_point_in": "blocks.15.hook_resid_post", "jump_relu_threshold": 0.5,
        "dataset_average_activation_norm": {"in": 4.0, "out": 4.0}}))
    in_hub_cache(folder, "fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L15R-8x")
    pair, _ = scored("llama-3.1-8b-llama-scope")
    assert pair.model.model_type == "llama" and pair.sae.read_hook == "blocks.15.hook_resid_post"
    assert pair.sae.neuronpedia_id == "llama3.1-8b/15-llamascope-res-32k"
    # Llama Scope rescales its inputs by a norm scaling factor, which sae-lens folds into the encoder
    # (the registry's factor for this SAE, when it has one)
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    factor = get_pretrained_saes_directory()["llama_scope_lxr_8x"].norm_scaling_factor["l15r_8x"]
    np.testing.assert_allclose(np.asarray(pair.sae.W_enc_DxS), weights["encoder.weight"].T * factor, rtol=1e-5)

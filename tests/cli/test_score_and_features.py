"""`epo-tui score` and `epo-tui features` on the tiny helper model, checked against an independent
computation with transformers (PyTorch) and sae-lens."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epo_tui.cli import main
from epo_tui.engine.sae_writer import write_random_sae
from epo_tui.features import FeatureEntry
from epo_tui.tui.components.features import FuzzyFeatureSearch

TEXT = "Hello world, the quick brown fox"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _feature(tiny_dir: Path) -> int:
    import tomli

    return tomli.loads((tiny_dir / "config.toml").read_text())["feature"]["index"]


def test_score_json_matches_transformers_and_sae_lens(tiny_dir, capsys):
    import torch
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    feature = _feature(tiny_dir)
    code, out, err = _run(capsys, "score", "--config", str(tiny_dir / "config.toml"), "--json", TEXT)
    assert code == 0, err
    scored = json.loads(out)
    assert list(scored) == ["tokens", "token_bytes", "token_ids", "activations", "xent", "prompt_start"]
    assert scored["prompt_start"] == 1

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    ids = [tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert scored["token_ids"] == ids
    assert "".join(scored["tokens"]) == tokenizer.bos_token + TEXT
    assert [bytes.fromhex(b).decode() for b in scored["token_bytes"]] == scored["tokens"]  # all ASCII here

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()
    sae = SAE.load_from_disk(tiny_dir / "sae", device="cpu")
    with torch.no_grad():
        out_hf = hf(torch.tensor([ids]), output_hidden_states=True)
        resid = out_hf.hidden_states[1][0]  # blocks.1.hook_resid_pre
        resid = resid - resid.mean(-1, keepdim=True)  # TransformerLens's centred writing weights
        expected_acts = sae.encode(resid)[:, feature].numpy()
        logprobs = torch.log_softmax(out_hf.logits[0], -1).numpy()
    assert expected_acts.max() > 0, "the tiny config's feature should fire on this text"
    np.testing.assert_allclose(scored["activations"], expected_acts, atol=1e-4)
    assert scored["xent"][0] is None
    expected_xent = [-logprobs[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(scored["xent"][1:], expected_xent, atol=1e-4)


def test_score_with_prefix_puts_it_after_bos(tiny_dir, capsys, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text((tiny_dir / "config.toml").read_text()
                      .replace('path = "model"', f'path = "{tiny_dir / "model"}"')
                      .replace('path = "sae"', f'path = "{tiny_dir / "sae"}"')
                      + 'prefix = "Question: "\n')
    code, out, _ = _run(capsys, "score", "--config", str(config), "--json", "fox")
    assert code == 0
    assert "".join(json.loads(out)["tokens"]) == "<|endoftext|>Question: fox"


def test_score_table_is_plain_when_piped(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "epo_tui", "score", "--config", str(tiny_dir / "config.toml"),
                           TEXT], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")})
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["pos", "token", "id", f"act[{_feature(tiny_dir)}]", "xent"]
    assert lines[1].split()[:2] == ["0", "'<|endoftext|>'"] and lines[1].split()[-1] == "-"
    assert lines[-1].startswith("max act ") and " mean xent " in lines[-1]


def test_score_is_coloured_in_a_terminal(tiny_dir):
    env = {**os.environ, "FORCE_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "epo_tui", "score", "--config", str(tiny_dir / "config.toml"),
                           TEXT], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" in proc.stdout
    # the text's tokens (BOS left out, as in the UI) run together on activation-coloured backgrounds
    coloured = [line for line in proc.stdout.splitlines()
                if re.sub(r"\x1b\[[0-9;]*m", "", line) == TEXT]
    assert len(coloured) == 1 and coloured[0].count("\x1b[") > 5


def test_token_text_with_escape_sequences_reaches_the_terminal_inert(tiny_dir, capsys):
    code, out, _ = _run(capsys, "score", "--config", str(tiny_dir / "config.toml"), "red \x1b[31m alert\x07")
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b" in out


@pytest.mark.parametrize("argv, message", [
    (["--feature", "64"], "epo-tui: error: --feature: 64 is out of range for this SAE (0..63)"),
    (["--feature", "-1"], "--feature: must be >= 0, found -1"),
])
def test_score_feature_errors(tiny_dir, capsys, argv, message):
    code, out, err = _run(capsys, "score", "--config", str(tiny_dir / "config.toml"), *argv, TEXT)
    assert code == 2 and out == ""
    assert err.startswith("epo-tui: error: ") and message in err and err.count("\n") == 1


def test_feature_out_of_range_in_the_config_names_the_file(tiny_dir, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{tiny_dir / "model"}"\n[sae]\npath = "{tiny_dir / "sae"}"\n'
                      '[feature]\nindex = 99\n')
    code, _, err = _run(capsys, "score", "--config", str(config), TEXT)
    assert code == 2
    assert err == f"epo-tui: error: {config}: feature.index: 99 is out of range for this SAE (0..63)\n"


def test_score_empty_and_too_long_text(tiny_dir, capsys):
    config = str(tiny_dir / "config.toml")
    code, _, err = _run(capsys, "score", "--config", config, "")
    assert code == 2 and "the text to score is empty" in err
    code, _, err = _run(capsys, "score", "--config", config, "word " * 400)
    assert code == 2 and "the model reads at most 128" in err


def _config_with_sae(tiny_dir: Path, tmp_path: Path, sae_dir: Path) -> str:
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{tiny_dir / "model"}"\n[sae]\npath = "{sae_dir}"\n[feature]\nindex = 0\n')
    return str(config)


def test_sae_hook_not_in_the_model(tiny_dir, tmp_path, capsys):
    sae = write_random_sae(tmp_path / "sae", d_in=32, d_sae=16, hook_name="blocks.5.hook_resid_pre")
    code, _, err = _run(capsys, "score", "--config", _config_with_sae(tiny_dir, tmp_path, sae), "x")
    assert code == 2
    assert "hook 'blocks.5.hook_resid_pre' is not in the model: it has 2 layers (0..1)" in err


def test_sae_width_not_the_model_width(tiny_dir, tmp_path, capsys):
    sae = write_random_sae(tmp_path / "sae", d_in=16, d_sae=16, hook_name="blocks.1.hook_resid_pre")
    code, _, err = _run(capsys, "score", "--config", _config_with_sae(tiny_dir, tmp_path, sae), "x")
    assert code == 2
    assert "the SAE reads 16-wide activations at 'blocks.1.hook_resid_pre' but model" in err
    assert "has d_model = 32 there" in err


def test_unknown_release_suggests_the_close_one(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[sae]\nrelease = "gpt2-smal-res-jb"\nid = "blocks.8.hook_resid_pre"\n')
    code, _, err = _run(capsys, "score", "--config", str(config), "x")
    assert code == 2
    assert f"{config}: sae.release: 'gpt2-smal-res-jb' is not a sae-lens release; did you mean " \
           "'gpt2-small-res-jb'?" in err


def test_registry_sae_not_downloadable_offline(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[sae]\nrelease = "gpt2-small-res-jb"\nid = "blocks.8.hook_resid_pre"\n')
    code, _, err = _run(capsys, "score", "--config", str(config), "x")
    assert code == 2
    assert "cannot load 'gpt2-small-res-jb' / 'blocks.8.hook_resid_pre'" in err
    assert "HF_HUB_OFFLINE is set" in err and "sae.path" in err and err.count("\n") == 1


def test_features_json_lists_every_latent_with_its_logit_lens_tokens(tiny_dir, capsys):
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    code, out, _ = _run(capsys, "features", "--config", str(tiny_dir / "config.toml"), "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == list(range(64))
    assert all(len(r["top_tokens"]) == 8 and len(r["top_token_ids"]) == 8 for r in rows)

    weights = load_file(str(tiny_dir / "model" / "model.safetensors"))
    W_dec = load_file(str(tiny_dir / "sae" / "sae_weights.safetensors"))["W_dec"]
    W_U = weights["transformer.wte.weight"] * weights["transformer.ln_f.weight"]
    logits = W_dec @ W_U.T
    logits[:, 0] = -np.inf  # <|endoftext|> is special: never a top token
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}  # GPT-2's byte-level alphabet

    def shown(token_id: int) -> str:  # a lone byte of a UTF-8 character (decoded alone: U+FFFD) as \xNN
        text = tokenizer.decode([token_id])
        piece = tokenizer.convert_ids_to_tokens(token_id)
        return text if "\ufffd" not in text else "".join(f"\\x{byte_of[c]:02x}" for c in piece)

    for row in rows[:10]:
        expected = np.argsort(-logits[row["index"]])[:8].tolist()
        assert row["top_token_ids"] == expected
        assert row["top_tokens"] == [shown(i) for i in expected]
    assert not any("\ufffd" in t for r in rows for t in r["top_tokens"])


def test_features_carry_the_saes_firing_densities_and_mark_dead_latents(tiny_dir, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from epo_tui.features import alive_indices

    sae_dir = tmp_path / "sae"
    shutil.copytree(tiny_dir / "sae", sae_dir)
    density = load_file(str(sae_dir / "sparsity.safetensors"))["sparsity"]
    density[[3, 40]] = -10.0  # never fired (sae-lens's record of 0)
    density[41] = -8.5  # below sae-lens's dead threshold of 1e-8
    save_file({"sparsity": density}, str(sae_dir / "sparsity.safetensors"))
    config = _config_with_sae(tiny_dir, tmp_path, sae_dir)
    _, out, _ = _run(capsys, "features", "--config", config, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    np.testing.assert_allclose([r["log10_density"] for r in rows], density, atol=1e-4)
    entries = [FeatureEntry.from_json(r) for r in rows]
    assert alive_indices(entries) == set(range(64)) - {3, 40, 41}
    _, out, _ = _run(capsys, "features", "--config", config)
    dead = [line.split()[0] for line in out.splitlines() if line.split()[1] == "(dead)"]
    assert dead == ["3", "40", "41"]
    assert alive_indices([dataclasses.replace(e, log10_density=None) for e in entries]) is None  # no record


def test_features_search_limit_and_plain_output(tiny_dir, capsys):
    config = str(tiny_dir / "config.toml")
    _, out, _ = _run(capsys, "features", "--config", config, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    word = rows[7]["top_tokens"][0].strip() or rows[7]["top_tokens"][1].strip()
    _, out, _ = _run(capsys, "features", "--config", config, "--json", "--search", word)
    found = [json.loads(line)["index"] for line in out.splitlines()]
    assert 7 in found
    containing = {r["index"] for r in rows if any(word.casefold() in t.casefold() for t in r["top_tokens"][:8])}
    assert containing <= set(found)
    # the UI's feature list finds the same latents (it only ranks them its own way)
    entries = [FeatureEntry.from_json(r) for r in rows]
    ui_search = FuzzyFeatureSearch(entries)
    assert sorted(found) == sorted(entries[p].index for p in ui_search.filter(word))
    _, out, _ = _run(capsys, "features", "--config", config, "--search", "#12")
    assert [line.split()[0] for line in out.splitlines()] == ["12"]
    _, out, _ = _run(capsys, "features", "--config", config, "--search", "12")
    assert out.split()[0] == "12"
    _, out, _ = _run(capsys, "features", "--config", config, "--limit", "3")
    assert [line.split()[0] for line in out.splitlines()] == ["0", "1", "2"]


def test_features_catalog_is_cached(tiny_dir, capsys, monkeypatch):
    import epo_tui.engine.feature_catalog as lens

    config = str(tiny_dir / "config.toml")
    _run(capsys, "features", "--config", config, "--limit", "1")

    def fail(*_args, **_kwargs):
        raise AssertionError("the catalog was computed again")

    monkeypatch.setattr(lens, "compute_catalog", fail)
    code, out, _ = _run(capsys, "features", "--config", config, "--limit", "1")
    assert code == 0 and out.split()[0] == "0"


def test_a_changed_local_sae_gets_a_new_catalog(tiny_dir, tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    shutil.copytree(tiny_dir / "sae", sae_dir)
    config = _config_with_sae(tiny_dir, tmp_path, sae_dir)
    _, before, _ = _run(capsys, "features", "--config", config, "--json", "--limit", "5")
    write_random_sae(sae_dir, d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_pre", seed=7, input_norm=0.65)
    _, after, _ = _run(capsys, "features", "--config", config, "--json", "--limit", "5")
    assert before != after


def _labelled_config(tiny_dir: Path, tmp_path: Path, neuronpedia_id: str | None, records: list[dict]) -> str:
    """A config on the tiny model, a tiny SAE whose cfg.json carries `neuronpedia_id`, and sae.labels."""
    from epo_tui.labels import write_explanations

    sae = write_random_sae(tmp_path / "sae", d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_pre",
                           neuronpedia_id=neuronpedia_id, input_norm=0.65)
    write_explanations(tmp_path / "explanations.jsonl.gz", records)
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{tiny_dir / "model"}"\n[sae]\npath = "{sae}"\n'
                      f'labels = "{tmp_path / "explanations.jsonl.gz"}"\n[feature]\nindex = 0\n')
    return str(config)


def test_features_refuse_labels_exported_for_another_layer(tiny_dir, tmp_path, capsys):
    records = [{"modelId": "tiny", "layer": "0-res-test", "index": str(i), "description": f"layer 0 latent {i}"}
               for i in range(64)]
    config = _labelled_config(tiny_dir, tmp_path, "tiny/1-res-test", records)
    code, out, err = _run(capsys, "features", "--config", config, "--json")
    assert code == 2 and out == ""
    assert err == (f"epo-tui: error: {tmp_path / 'explanations.jsonl.gz'}: an export for tiny/0-res-test, not for "
                   "this SAE (tiny/1-res-test): not imported\n")


def test_features_labels_take_the_best_explanation_and_report_what_they_skip(tiny_dir, tmp_path, capsys):
    mine = {"modelId": "tiny", "layer": "1-res-test"}
    records = [{**mine, "index": "3", "description": ""}, {**mine, "index": "3", "description": "French words"},
               {**mine, "index": "5", "description": "a guess", "scores": [{"value": 0.05}]},
               {**mine, "index": "5", "description": "Python code", "scores": [{"value": 0.9}]},
               {**mine, "index": "64", "description": "past the end"},
               {**mine, "index": "70", "description": "past the end"}]
    config = _labelled_config(tiny_dir, tmp_path, "tiny/1-res-test", records)
    code, out, err = _run(capsys, "features", "--config", config, "--json")
    assert code == 0, err
    labels = {row["index"]: row["label"] for row in map(json.loads, out.splitlines()) if row["label"]}
    assert labels == {3: "French words", 5: "Python code"}
    where = f"epo-tui: sae.labels {tmp_path / 'explanations.jsonl.gz'}: "
    assert [line for line in err.splitlines() if "sae.labels" in line] == [
        where + "skipped 2 explanations for latents past d_sae=64", where + "ignored 1 empty explanation"]
    # an SAE without a Neuronpedia id: the same file is applied, and said unchecked
    shutil.rmtree(tmp_path / "sae")
    config = _labelled_config(tiny_dir, tmp_path, None, records)
    code, out, err = _run(capsys, "features", "--config", config, "--json")
    assert code == 0 and sum(1 for line in out.splitlines() if json.loads(line)["label"]) == 2
    assert where + "not checked against the SAE: it has no Neuronpedia id (it names tiny/1-res-test)" in err

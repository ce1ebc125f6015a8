"""`epo-tui import`: Neuronpedia's exports of the demo SAE, written here in Neuronpedia's layout, become its
labels and dataset statistics in the data folder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from cli_run import run_cli

from epo_tui import dataset_stats, labels, paths
from epo_tui.config import load_config

DEMO_MODEL, DEMO_LAYER = "epo-tui-demo-gpt2", "2-res-demo"  # the demo SAE's neuronpedia_id, split


@pytest.fixture(autouse=True)
def _own_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def _demo_key() -> str:
    """The UI's key of the demo SAE: the worker's Ready.model (the model's folder) | Ready.sae (the SAE's)."""
    config = load_config(str(paths.demo_config_file()))
    return dataset_stats.sae_key(config.model.path, config.sae.path)


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _activation(index, tokens, values, layer=DEMO_LAYER) -> dict:
    top = max(range(len(values)), key=values.__getitem__)
    return {"modelId": DEMO_MODEL, "layer": layer, "index": str(index), "tokens": tokens, "values": values,
            "maxValue": values[top], "maxValueTokenIndex": top}


def _demo_export(root: Path, layer: str = DEMO_LAYER) -> Path:
    """v1/<model>/<source>/ as Neuronpedia lays it out, for the demo SAE (or another layer)."""
    folder = root / "v1" / DEMO_MODEL / layer
    _write(folder / "source.jsonl", [{"id": layer, "modelId": DEMO_MODEL, "saelensRelease": None,
                                      "saelensSaeId": None}])
    _write(folder / "explanations" / "batch-0.jsonl.gz",
           [{"modelId": DEMO_MODEL, "layer": layer, "index": "524", "description": "Debian"},
            {"modelId": DEMO_MODEL, "layer": layer, "index": 524, "description": "a second, later explanation"},
            {"modelId": DEMO_MODEL, "layer": layer, "index": "3", "description": "three"}])
    _write(folder / "activations" / "batch-0.jsonl.gz",
           [_activation(524, ["<|endoftext|>", " Debian"], [0.0, 4.5], layer),
            _activation(3, ["a", "b"], [0.5, 0.0], layer), _activation(524, ["x"], [1.0], layer)])
    _write(folder / "features" / "batch-0.jsonl",
           [{"modelId": DEMO_MODEL, "layer": layer, "index": "524", "maxActApprox": 4.25, "frac_nonzero": 0.003}])
    return folder


def test_a_demo_export_folder_becomes_labels_and_statistics(tmp_path):
    code, out, err = run_cli("import", "--demo", _demo_export(tmp_path / "export"))
    assert code == 0, err
    assert out.splitlines() == [
        f"imported 2 labels for {DEMO_MODEL}/{DEMO_LAYER}",
        f"imported statistics of 2 latents, 3 examples for {DEMO_MODEL}/{DEMO_LAYER}"]
    assert "file 1/2" in err and "file 2/2" in err  # progress, one line per file
    key = _demo_key()
    assert labels.read_imported(key) == {524: "Debian", 3: "three"}  # what the UI shows for this SAE
    stats = dataset_stats.load_sae_stats(key)
    assert stats.d_sae == 2048 and stats.provenance["sae_key"] == key
    assert stats.max(524) == 4.5 and stats.density(524) == 0.003
    assert [e.tokens for e in stats.examples(524)] == [("<|endoftext|>", " Debian"), ("x",)]


def test_an_export_for_another_sae_is_one_line_and_keeps_nothing(tmp_path):
    code, out, err = run_cli("import", "--demo", _demo_export(tmp_path / "export", layer="3-res-demo"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "an export of epo-tui-demo-gpt2/3-res-demo, not of this SAE" in err
    assert labels.read_imported(_demo_key()) == {} and dataset_stats.load_sae_stats(_demo_key()) is None
    # the lines alone (no source.jsonl) are refused the same way
    lone = _write(tmp_path / "lone" / "activations" / "batch-0.jsonl", [_activation(1, ["a"], [1.0], "3-res-demo")])
    code, _, err = run_cli("import", "--demo", lone)
    assert code == 2 and err.count("\n") == 1 and "an export for epo-tui-demo-gpt2/3-res-demo" in err


def test_a_truncated_batch_is_one_line_and_the_earlier_import_stays(tmp_path):
    assert run_cli("import", "--demo", _demo_export(tmp_path / "export"))[0] == 0
    stats_before = {p.name: p.read_bytes() for p in dataset_stats.stats_folder(_demo_key()).iterdir()}
    batch = _write(tmp_path / "new" / "activations" / "batch-1.jsonl.gz",
                   [_activation(i, ["a", "b"], [0.0, float(i)]) for i in range(100)])
    batch.write_bytes(batch.read_bytes()[:-40])
    explanations = _write(tmp_path / "new" / "explanations" / "batch-1.jsonl",
                          [{"modelId": DEMO_MODEL, "layer": DEMO_LAYER, "index": "7", "description": "seven"}])
    code, out, err = run_cli("import", "--demo", tmp_path / "new")
    assert code == 2 and out == ""
    assert err.startswith(f"epo-tui: error: {batch}: not a readable gzip file after line") and err.count("\n") == 1
    after = {p.name: p.read_bytes() for p in dataset_stats.stats_folder(_demo_key()).iterdir()}
    assert after == stats_before
    assert 7 not in labels.read_imported(_demo_key())  # the labels read beside it are not kept either
    assert explanations.exists()


@pytest.mark.parametrize("argv, reason", [
    (["import", "--demo"], "the following arguments are required: PATH"),
    (["import", "--demo", "/nonexistent/export"], "no such file or folder"),
    (["import", "--demo", "--top-k", "0", "."], "--top-k: must be >= 1"),
])
def test_bad_input_is_one_line(argv, reason):
    code, out, err = run_cli(*argv)
    assert code == 2 and out == "" and reason in err and err.count("\n") == 1


@pytest.mark.slow
def test_neuronpedias_values_are_the_activations_score_reports(tmp_path):
    """An activations export written from our own `score` output imports as exactly those activations."""
    text, feature = "Install it with apt-get on Debian", 524
    code, out, err = run_cli("score", "--demo", "--json", "--feature", feature, text)
    assert code == 0, err
    scored = json.loads(out)
    values = scored["activations"]
    assert max(values) > 0  # the latent fires on this text
    export = _write(tmp_path / "v1" / DEMO_MODEL / DEMO_LAYER / "activations" / "batch-0.jsonl.gz",
                    [_activation(feature, scored["tokens"], values)])
    assert run_cli("import", "--demo", export)[0] == 0
    stats = dataset_stats.load_sae_stats(_demo_key())
    (example,) = stats.examples(feature)
    assert list(example.values) == values and list(example.tokens) == scored["tokens"]
    assert example.max_value == max(values) == stats.max(feature)
    assert example.max_position == values.index(max(values))
    assert stats.ratio_to_max(max(values), feature) == 1.0

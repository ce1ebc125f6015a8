"""Importing Neuronpedia's activations and features exports (epo_tui.neuronpedia) into the dataset
statistics store, from files written here in Neuronpedia's export layout."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from epo_tui.dataset_stats import load_sae_stats, stats_folder
from epo_tui.errors import UserError
from epo_tui.export_lines import ExportTarget
from epo_tui.neuronpedia import check_sources, find_export_files, import_statistics, read_explanation_files

MODEL, LAYER = "gpt2-small", "6-res-jb"
TARGET = ExportTarget(neuronpedia_id=f"{MODEL}/{LAYER}", d_sae=64, release="gpt2-small-res-jb",
                      sae_id="blocks.6.hook_resid_pre")
KEY = "gpt2|gpt2-small-res-jb / blocks.6.hook_resid_pre"


@pytest.fixture(autouse=True)
def _own_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def _activation(index, values, tokens=None, layer=LAYER, model=MODEL, **fields) -> dict:
    """A line as Neuronpedia's activations export writes it (index as a string, unless given as an int)."""
    tokens = tokens or [f"t{i}" for i in range(len(values))]
    top = max(range(len(values)), key=values.__getitem__)
    return {"id": "clx", "modelId": model, "layer": layer, "index": index if isinstance(index, int) else str(index),
            "creatorId": "c", "dataSource": None, "tokens": tokens, "maxValue": values[top], "minValue": min(values),
            "values": values, "maxValueTokenIndex": top, "dfaValues": [], "binMin": None, **fields}


def _feature(index, max_act, density, layer=LAYER, **fields) -> dict:
    return {"modelId": MODEL, "layer": layer, "index": str(index), "maxActApprox": max_act, "frac_nonzero": density,
            "freq_hist_data_bar_values": [0.5, 1.5, 2.5], "freq_hist_data_bar_heights": [10, 4, 1],
            "pos_str": [" Debian"], "pos_values": [1.2], "neg_str": [" the"], "neg_values": [-0.8], **fields}


def _write(path: Path, records: list[dict], gz: bool | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if (gz if gz is not None else path.name.endswith(".gz")) else data)
    return path


def _store_files(key: str = KEY) -> dict[str, bytes]:
    folder = stats_folder(key)
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("as_int", [False, True])
def test_examples_are_kept_per_latent_best_first(tmp_path, gz, as_int):
    records = [_activation(3 if as_int else "3", [0.0, 1.0, 0.5]), _activation(7, [2.0, 0.0]),
               _activation("3", [0.1, 0.2, 4.0, 0.0], tokens=["a", " b", " c", "\n"]),
               _activation(3, [0.3, 0.0, 0.0])]  # one latent's lines need not be together
    path = _write(tmp_path / ("batch-0.jsonl.gz" if gz else "batch-0.jsonl"), records, gz=gz)
    imported = import_statistics(KEY, [path], [], TARGET, top_k=2)
    assert (imported.latents, imported.examples) == (2, 3)
    assert imported.notes == ("kept the top 2 examples of each latent (1 fewer)",)
    stats = load_sae_stats(KEY)
    assert stats.d_sae == 64
    best = stats.examples(3)
    assert [e.max_value for e in best] == [4.0, 1.0]
    assert best[0].tokens == ("a", " b", " c", "\n") and best[0].values == (0.1, 0.2, 4.0, 0.0)
    assert best[0].max_position == 2
    assert stats.max(3) == 4.0 and stats.max(7) == 2.0 and stats.max(0) is None
    assert stats.density(3) is None  # activations say nothing of how often a latent fires


def test_features_give_maximum_density_and_histogram(tmp_path):
    features = _write(tmp_path / "features" / "batch-0.jsonl.gz", [_feature(3, 3.5, 0.002), _feature(9, 1.0, 0.5),
                                                                      _feature(10, None, None)])
    activations = _write(tmp_path / "activations" / "batch-0.jsonl", [_activation(3, [0.0, 3.75]),
                                                                       _activation(9, [0.5, 0.0])])
    imported = import_statistics(KEY, [activations], [features], TARGET)
    assert imported.latents == 3 and imported.notes == ()
    stats = load_sae_stats(KEY)
    assert stats.max(3) == 3.75  # the larger of maxActApprox and the examples' maxima
    assert stats.max(9) == 1.0
    assert stats.density(3) == 0.002 and stats.density(10) is None and stats.max(10) is None
    histogram = stats.histogram(3)
    assert list(histogram.edges_E) == [0.0, 1.0, 2.0, 3.0] and list(histogram.counts_B) == [10, 4, 1]


def test_an_export_for_another_sae_is_refused_in_one_line_and_keeps_nothing(tmp_path):
    path = _write(tmp_path / "batch-0.jsonl.gz", [_activation(i, [1.0], layer="8-res-jb") for i in range(5)])
    with pytest.raises(UserError) as err:
        import_statistics(KEY, [path], [], TARGET)
    assert str(err.value) == (f"{path}: an export for gpt2-small/8-res-jb, not for this SAE (gpt2-small/6-res-jb): "
                              "not imported")
    assert _store_files() == {}


def test_a_mixed_file_keeps_this_saes_lines_and_counts_the_rest(tmp_path):
    records = [_activation(1, [1.0]), _activation(1, [9.0], layer="8-res-jb"), _activation(2, [2.0], model="gemma-2-2b"),
               _activation(63, [0.5]), _activation(64, [5.0]), _activation(500, [5.0]),
               {k: v for k, v in _activation(4, [0.25]).items() if k != "layer"}]
    imported = import_statistics(KEY, [_write(tmp_path / "mixed.jsonl", records)], [], TARGET)
    assert imported.notes == ("skipped 2 lines for other SAEs (gpt2-small/8-res-jb, gemma-2-2b/6-res-jb)",
                              "skipped 2 lines for latents past d_sae=64",
                              "1 line names no modelId/layer: not checked against this SAE (gpt2-small/6-res-jb)")
    stats = load_sae_stats(KEY)
    assert list(stats.indices_with_examples()) == [1, 4, 63] and stats.max(1) == 1.0


@pytest.mark.parametrize("damage, reason", [
    ("truncated", "not a readable gzip file after line"),
    ("bad json", "line 3: not valid JSON"),
    ("lengths", "line 2: 3 tokens but 2 values"),
    ("values", "line 2: 'values' must hold finite numbers"),
    ("index", "line 2: 'index' must be an integer"),
])
def test_a_damaged_file_is_one_line_and_the_earlier_import_stays(tmp_path, damage, reason):
    earlier = _write(tmp_path / "earlier.jsonl", [_activation(5, [0.5, 2.0])])
    import_statistics(KEY, [earlier], [_write(tmp_path / "f.jsonl", [_feature(5, 2.0, 0.1)])], TARGET)
    before = _store_files()
    good = [_activation(i, [float(i), 0.0]) for i in range(40)]
    if damage == "truncated":
        path = tmp_path / "batch-1.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in good).encode())[:-30])
    elif damage == "bad json":
        path = _write(tmp_path / "batch-1.jsonl", good[:2])
        path.write_text(path.read_text() + '{"index": "3", "tokens": [\n')
    else:
        bad = {**good[2], **{"lengths": {"tokens": ["a", "b", "c"]}, "values": {"values": [1.0, "2"]},
                             "index": {"index": "two"}}[damage]}
        path = _write(tmp_path / "batch-1.jsonl", [good[0], bad])
    with pytest.raises(UserError) as err:
        import_statistics(KEY, [earlier, path], [], TARGET)  # the good file first: nothing of it is kept
    message = str(err.value)
    assert str(path) in message and reason in message and "\n" not in message
    assert _store_files() == before
    assert sorted(p.name for p in stats_folder(KEY).parent.iterdir()) == ["neuronpedia"]  # no temp folder left


def test_a_later_import_merges_newest_first_per_latent(tmp_path):
    first = _write(tmp_path / "a.jsonl", [_activation(1, [1.0]), _activation(2, [2.0])])
    import_statistics(KEY, [first], [_write(tmp_path / "fa.jsonl", [_feature(1, 1.0, 0.1), _feature(2, 2.0, 0.2)])],
                      TARGET)
    second = _write(tmp_path / "b.jsonl.gz", [_activation(2, [0.5, 0.25]), _activation(3, [3.0])])
    import_statistics(KEY, [second], [], TARGET)
    stats = load_sae_stats(KEY)
    assert [e.values for e in stats.examples(1)] == [(1.0,)]  # only the first import knew latent 1
    assert [e.values for e in stats.examples(2)] == [(0.5, 0.25)]  # the second's examples replace the first's
    assert [e.values for e in stats.examples(3)] == [(3.0,)]
    assert stats.max(2) == 0.5 and stats.max(1) == 1.0 and stats.max(3) == 3.0
    assert stats.density(2) == 0.2  # the second import knew no density: the first's stays
    assert stats.histogram(1) is not None


def test_a_folder_in_neuronpedias_layout(tmp_path):
    root = tmp_path / "v1" / MODEL / LAYER
    source = {"id": LAYER, "modelId": MODEL, "saelensRelease": "gpt2-small-res-jb",
              "saelensSaeId": "blocks.6.hook_resid_pre", "setName": "res-jb", "hfRepoId": None}
    _write(root / "source.jsonl", [source])
    _write(root / "model.jsonl", [{"id": MODEL}])
    for batch in (0, 1, 10):
        _write(root / "activations" / f"batch-{batch}.jsonl.gz", [_activation(batch, [1.0 + batch])])
        _write(root / "features" / f"batch-{batch}.jsonl.gz", [_feature(batch, 1.0 + batch, 0.01)])
    _write(root / "explanations" / "batch-0.jsonl.gz",
           [{"modelId": MODEL, "layer": LAYER, "index": "0", "description": "first"},
            {"modelId": MODEL, "layer": LAYER, "index": 0, "description": "second"},
            {"modelId": MODEL, "layer": LAYER, "index": "1", "description": "one"}])
    files = find_export_files([tmp_path / "v1"])
    assert [p.name for p in files.activations] == ["batch-0.jsonl.gz", "batch-1.jsonl.gz", "batch-10.jsonl.gz"]
    assert len(files.features) == 3 and len(files.explanations) == 1 and files.sources == (root / "source.jsonl",)
    assert check_sources(files.sources, TARGET) == ()
    assert read_explanation_files(files.explanations, TARGET).labels == {0: "first", 1: "one"}
    imported = import_statistics(KEY, files.activations, files.features, TARGET)
    assert (imported.latents, imported.examples) == (3, 3)
    assert load_sae_stats(KEY).max(10) == 11.0
    # single files are told apart by their folder, else by what their first line holds
    loose = _write(tmp_path / "loose.jsonl", [_feature(1, 1.0, 0.1)])
    assert find_export_files([loose]).features == (loose,)
    # the SAE matched by sae-lens release and id when it has no Neuronpedia id
    assert check_sources(files.sources, ExportTarget(None, 64, "gpt2-small-res-jb", "blocks.6.hook_resid_pre")) == ()
    with pytest.raises(UserError) as err:
        check_sources(files.sources, ExportTarget("gpt2-small/8-res-jb", 64))
    assert str(err.value) == (f"{root / 'source.jsonl'}: an export of gpt2-small/6-res-jb, sae-lens gpt2-small-res-jb / "
                              "blocks.6.hook_resid_pre, not of this SAE (gpt2-small/8-res-jb): not imported")
    with pytest.raises(UserError, match="no such file"):
        find_export_files([tmp_path / "missing"])
    with pytest.raises(UserError, match="no Neuronpedia export files"):
        find_export_files([_write(tmp_path / "elsewhere" / "notes.txt", []).parent])


def test_explanations_in_several_files_the_later_file_wins(tmp_path):
    one = _write(tmp_path / "explanations" / "batch-0.jsonl",
                 [{"modelId": MODEL, "layer": LAYER, "index": "4", "description": "early"},
                  {"modelId": MODEL, "layer": "8-res-jb", "index": "5", "description": "other"}])
    two = _write(tmp_path / "explanations" / "batch-1.jsonl.gz",
                 [{"modelId": MODEL, "layer": LAYER, "index": 4, "description": "late"}])
    imported = read_explanation_files([one, two], TARGET)
    assert imported.labels == {4: "late"}
    assert imported.notes == ("batch-0.jsonl: skipped 1 explanation for other SAEs (gpt2-small/8-res-jb)",)


def test_an_import_reads_line_by_line(tmp_path):
    """A big export imports in a small fraction of its size in memory: examples stream to a temp file."""
    rng = np.random.default_rng(0)
    tokens = [f" token{i}" for i in range(64)]
    path = tmp_path / "batch-0.jsonl"
    with open(path, "w") as out:
        for line in range(3000):
            out.write(json.dumps(_activation(line % 500, [round(float(v), 6) for v in rng.random(64)], tokens)) + "\n")
    size = path.stat().st_size
    assert size > 4_000_000
    tracemalloc.start()
    try:
        imported = import_statistics(KEY, [path], [], ExportTarget(TARGET.neuronpedia_id, d_sae=512), top_k=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert imported.examples == 1000
    assert peak < size / 5, f"peak {peak:,} bytes for a {size:,}-byte export"

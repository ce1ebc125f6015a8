"""Results against the dataset: result.json's "dataset" entry, the report's sentence and columns, and a
batch index ordered by each feature's ratio to its dataset maximum (exact markdown)."""

from __future__ import annotations

import numpy as np

from epo_tui import results
from epo_tui.dataset_stats import Example, load_stats, write_stats


def _stats(tmp_path):
    """Latent 3: maximum 2.0 with a histogram (4 tokens in [0, 1), 4 in [1, 2)); latent 5: maximum 4.0
    without one; latent 6: unknown."""
    max_F, density_F = np.array([np.nan] * 3 + [2.0, np.nan, 4.0, np.nan]), np.full(7, 0.01)
    edges_FxE, counts_FxB = np.full((7, 3), np.nan), np.zeros((7, 2))
    edges_FxE[3], counts_FxB[3] = [0.0, 1.0, 2.0], [4, 4]
    write_stats(tmp_path / "s", max_F, density_F, [(3, [Example.of(["a"], [2.0])])], (counts_FxB, edges_FxE),
                {"origin": "local"})
    return load_stats(tmp_path / "s")


def _elite(act: float, xent: float) -> dict:
    return {"penalty": 1.0, "act": act, "xent": xent, "tokens": ["<bos>", " hi"], "activations": [0.0, act],
            "token_ids": [0, 1], "prompt_start": 1, "text": " hi"}


def test_a_result_compares_each_elite_with_the_dataset(tmp_path):
    stats = _stats(tmp_path)
    result = {"feature": {"kind": "sae", "indices": [3]}, "elites": [_elite(2.5, 4.0), _elite(1.5, 3.0)]}
    block = results.with_dataset(result, stats)["dataset"]
    assert block == {"latent": 3, "max": 2.0, "density": 0.01, "origin": "local", "ratios": [1.25, 0.75],
                     "percentiles": [100.0, 75.0]}
    assert "dataset" not in results.with_dataset({**result, "feature": {"kind": "sae", "indices": [3, 5]}}, stats)
    assert "dataset" not in results.with_dataset({**result, "feature": {"kind": "sae", "indices": [6]}}, stats)
    assert results._dataset_lines(block) == [
        "Dataset maximum of latent 3: 2.000 (local); the best elite reaches 1.25× it, above 100% of its "
        "activations on the dataset.", ""]
    assert results.elites_table(result["elites"], block) == [
        "| # | λ | act | × dataset max | percentile | xent | prompt |",
        "|---:|---:|---:|---:|---:|---:|---|",
        "| 1 | 1.00 | 2.500 | 1.25× | 100 | 4.000 |  hi |",
        "| 2 | 1.00 | 1.500 | 0.75× | 75 | 3.000 |  hi |"]


def test_a_batch_index_goes_by_the_ratio_to_the_dataset_maximum(tmp_path):
    stats = _stats(tmp_path)
    summaries = [{"feature": f, "act": act, "xent": 3.0, "prompt": " hi", "token_ids": [1], "iterations_run": 5,
                  "interrupted": False, "process_id": 0, "folder": f"feature-{f}"}
                 for f, act in ((3, 2.5), (5, 4.4), (6, 9.0))]
    index = results.build_index(summaries, model="m", sae={"name": "s", "hook": "h"}, features_requested=[3, 5, 6],
                                interrupted=False, process={"id": 0, "count": 1}, dataset=stats)
    # 3 reaches 1.25x its maximum, 5 1.1x, 6 has none (last, although its act is the largest)
    assert [(e["feature"], e["dataset_ratio"]) for e in index["features"]] == [(3, 1.25), (5, 1.1), (6, None)]
    assert results.render_index(index).splitlines()[4:8] == [
        "| feature | best act | × dataset max | xent | prompt | report |",
        "|---:|---:|---:|---:|---|---|",
        "| 3 | 2.500 | 1.25× | 3.000 |  hi | [feature\\-3](feature-3/report.md) |",
        "| 5 | 4.400 | 1.10× | 3.000 |  hi | [feature\\-5](feature-5/report.md) |"]
    plain = results.build_index(summaries, model="m", sae={"name": "s", "hook": "h"}, features_requested=[3, 5, 6],
                                interrupted=False, process={"id": 0, "count": 1})
    assert [e["feature"] for e in plain["features"]] == [6, 5, 3] and "dataset_ratio" not in plain["features"][0]

"""The demo pack ships its SAE's dataset statistics over its held-out text (demo/heldout_stats.py), found
offline under the demo's SAE key."""

from __future__ import annotations

import numpy as np
import pytest

from epo_tui import dataset_stats, paths
from epo_tui.config import load_config
from epo_tui.demo import heldout_stats

PACK = paths.demo_pack()
pytestmark = pytest.mark.skipif(not (PACK / dataset_stats.SHIPPED_FOLDER / dataset_stats.STATS_FILE).is_file(),
                                reason="the demo pack's statistics are not built")


@pytest.fixture(autouse=True)
def _own_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # no local or imported store


def _demo_key() -> str:
    config = load_config(str(paths.demo_config_file()))
    return dataset_stats.sae_key(config.model.path, config.sae.path)  # as the UI forms it


def test_the_demo_finds_its_shipped_statistics_and_they_are_small():
    stats = dataset_stats.load_best_stats(_demo_key())
    assert stats is not None and stats.folder == PACK / dataset_stats.SHIPPED_FOLDER
    assert stats.d_sae == 2048 and stats.provenance["origin"] == "local"
    assert stats.provenance["text"] == "heldout.jsonl"
    size = sum(p.stat().st_size for p in stats.folder.iterdir())
    assert size < 1_500_000
    latent = 524  # the demo's default feature ("Debian")
    assert stats.max(latent) > 0 and 0 < stats.density(latent) < 1
    examples = stats.examples(latent)
    assert 1 <= len(examples) <= heldout_stats.TOP_K
    assert all(len(e.tokens) <= sum(heldout_stats.WINDOW) + 1 for e in examples)
    assert examples[0].max_value == pytest.approx(stats.max(latent), abs=0.005)  # values to 2 decimals
    assert "Debian" in "".join(examples[0].tokens)
    histogram = stats.histogram(latent)
    assert histogram.percentile(stats.max(latent)) == 100.0 and histogram.percentile(0.0) == 0.0
    fired = stats.max_F > 0
    assert np.array_equal(fired, stats.density_F > 0)
    assert set(stats.indices_with_examples()) == set(np.flatnonzero(fired))


@pytest.mark.slow
def test_the_shipped_maxima_are_the_quality_benchmarks_held_out_maxima():
    from epo_tui.bench import quality
    from epo_tui.engine.pairing import load_model_with_sae

    pair = load_model_with_sae(load_config(str(paths.demo_config_file())))
    tokens, mask = quality.heldout_rows(pair, quality.read_heldout(PACK / "heldout.jsonl"))
    maxima, _ = quality.dataset_maxima(pair, tokens, mask)
    stats = dataset_stats.load_stats(PACK / dataset_stats.SHIPPED_FOLDER)
    np.testing.assert_allclose(stats.max_F, np.maximum(maxima, 0.0), rtol=1e-5, atol=1e-4)

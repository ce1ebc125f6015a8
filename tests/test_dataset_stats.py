"""The per-SAE dataset statistics store (epo_tui.dataset_stats): written atomically, read back per latent."""

from __future__ import annotations

import math

import numpy as np
import pytest

from epo_tui.dataset_stats import (EXAMPLES_FILE, STATS_FILE, Example, load_sae_stats, load_stats, sae_key,
                                   stats_folder, write_stats)
from epo_tui.errors import UserError

F = 8


def _examples() -> dict[int, list[Example]]:
    return {5: [Example.of(["a", " b", " c"], [0.0, 2.5, 1.0]), Example.of(["x", " y"], [1.5, 0.0])],
            1: [Example.of(["“quoted” —", "\x1b[31m"], [0.25, 0.5])]}


def _write(folder, **overrides):
    max_F = np.full(F, np.nan)
    max_F[[1, 5, 6]] = [0.5, 2.5, 0.0]
    density_F = np.full(F, np.nan)
    density_F[[1, 5]] = [0.001, 0.25]
    counts = np.zeros((F, 3))
    edges = np.full((F, 4), np.nan)
    counts[5], edges[5] = [6, 3, 1], [0.0, 1.0, 2.0, 3.0]
    counts[1, :2], edges[1, :3] = [1, 1], [0.0, 0.25, 0.5]  # fewer bins: NaN-padded
    arguments = dict(max_F=max_F, density_F=density_F,
                     examples=iter(sorted(_examples().items(), reverse=True)),
                     histogram=(counts, edges), provenance={"origin": "test", "text": "x"})
    arguments.update(overrides)
    write_stats(folder, **arguments)


def test_a_store_round_trips_and_answers_per_latent(tmp_path):
    folder = tmp_path / "stats"
    _write(folder)
    assert sorted(p.name for p in folder.iterdir()) == [EXAMPLES_FILE, STATS_FILE]  # safetensors and jsonl only
    stats = load_stats(folder)
    assert stats.d_sae == F and stats.max_F.shape == (F,)
    assert stats.max(5) == 2.5 and stats.max(0) is None and stats.max(F) is None and stats.max(-1) is None
    assert stats.density(5) == 0.25 and stats.density(6) is None
    assert stats.examples(5) == _examples()[5] and stats.examples(1) == _examples()[1]
    assert stats.examples(0) == [] and stats.examples(99) == []
    assert list(stats.indices_with_examples()) == [1, 5]
    assert stats.ratio_to_max(5.0, 5) == 2.0
    assert stats.ratio_to_max(5.0, 0) is None  # unknown maximum
    assert stats.ratio_to_max(5.0, 6) is None  # a latent that never fired has no scale
    histogram = stats.histogram(5)
    assert list(histogram.edges_E) == [0, 1, 2, 3] and list(histogram.counts_B) == [6, 3, 1]
    assert histogram.percentile(1.5) == pytest.approx(75.0) and histogram.percentile(9) == 100.0
    assert list(stats.histogram(1).edges_E) == [0, 0.25, 0.5]
    assert stats.histogram(0) is None
    assert stats.provenance == {"origin": "test", "text": "x"}


def test_one_latents_examples_are_read_from_its_own_line(tmp_path):
    folder = tmp_path / "stats"
    _write(folder)
    stats = load_stats(folder)
    text = (folder / EXAMPLES_FILE).read_bytes()
    first_line = text.index(b"\n")  # latent 5's line comes first (the writer was given 5, then 1)
    (folder / EXAMPLES_FILE).write_bytes(b"#" * first_line + text[first_line:])
    assert stats.examples(1) == _examples()[1]
    with pytest.raises(UserError) as err:
        stats.examples(5)
    assert "latent 5" in str(err.value) and "\n" not in str(err.value)


def test_a_failed_write_leaves_the_old_store_and_no_temp_folder(tmp_path):
    folder = tmp_path / "stats"
    _write(folder)

    def failing():
        yield 1, _examples()[1]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write(folder, max_F=np.zeros(F), examples=failing())
    assert load_stats(folder).max(5) == 2.5
    assert [p.name for p in tmp_path.iterdir()] == ["stats"]


def test_a_store_set_aside_by_a_crash_is_put_back(tmp_path):
    folder = tmp_path / "stats"
    _write(folder)
    folder.rename(tmp_path / ".stats.old-12345678")  # a crash between the two renames
    assert load_stats(folder).max(5) == 2.5
    assert folder.is_dir()


@pytest.mark.parametrize("overrides, reason", [
    ({"density_F": np.zeros(F + 1)}, "density_F has shape"),
    ({"examples": iter([(F, [])])}, "outside"),
    ({"examples": iter([(1, []), (1, [])])}, "twice"),
    ({"histogram": (np.zeros((F, 2)), np.zeros((F, 2)))}, "histogram"),
])
def test_the_writer_refuses_what_does_not_fit(tmp_path, overrides, reason):
    with pytest.raises(ValueError, match=reason):
        _write(tmp_path / "stats", **overrides)
    assert not (tmp_path / "stats").exists()


def test_missing_and_damaged_stores(tmp_path):
    assert load_stats(tmp_path / "none") is None
    folder = tmp_path / "stats"
    _write(folder)
    (folder / STATS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(UserError) as err:
        load_stats(folder)
    assert "import them again" in str(err.value) and "\n" not in str(err.value)


def test_stores_are_filed_by_sae_key_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    key = sae_key("gpt2", "gpt2-small-res-jb / blocks.6.hook_resid_pre")
    assert key == "gpt2|gpt2-small-res-jb / blocks.6.hook_resid_pre"  # the UI's key: model | SAE display name
    folder = stats_folder(key)
    assert folder.parent.parent == tmp_path / "epo-tui" / "dataset" and folder.name == "neuronpedia"
    assert load_sae_stats(key) is None
    _write(folder)
    assert load_sae_stats(key).max(5) == 2.5
    assert stats_folder("another") != folder


def test_an_example_knows_its_maximum():
    example = Example.of(["a", "b", "c"], [1, 3, 3])
    assert (example.max_value, example.max_position) == (3.0, 1)  # the first of a tie
    assert Example.from_json(example.to_json()) == example
    for tokens, values in ((["a"], []), (["a", "b"], [1.0])):
        with pytest.raises(ValueError):
            Example.of(tokens, values)
    assert math.isclose(Example.of(["x"], [-0.5]).max_value, -0.5)


def test_the_best_stats_are_the_newest_store_else_the_demo_packs(tmp_path, monkeypatch):
    import os

    from epo_tui import dataset_stats, paths

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    pack = tmp_path / "pack"
    monkeypatch.setattr(paths, "demo_pack", lambda: pack)
    key = sae_key(str(pack / "model"), str(pack / "sae"))  # the demo's key: its model and SAE folders
    assert dataset_stats.load_best_stats(key) is None
    _write(pack / "dataset", provenance={"origin": "shipped"})
    assert dataset_stats.load_best_stats(key).provenance["origin"] == "shipped"
    for when, (folder, origin) in enumerate(((stats_folder(key), "neuronpedia"),
                                             (stats_folder(key, dataset_stats.LOCAL), "local")), 1):
        _write(folder, provenance={"origin": origin})
        os.utime(folder / STATS_FILE, ns=(when * 10**9, when * 10**9))  # written in this order
        assert dataset_stats.load_best_stats(key).provenance["origin"] == origin
    assert dataset_stats.shipped_stats_folder(sae_key("gpt2", str(pack / "sae"))) is None
    assert dataset_stats.load_best_stats(sae_key("gpt2", "x")) is None

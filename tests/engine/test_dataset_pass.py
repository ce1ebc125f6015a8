"""engine/dataset_pass.py: a pass over text in batches keeps what one brute-force pass over every row at once
finds (maximum, density, top-k rows and their per-token activations), in F x K x C memory."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from epo_tui import paths
from epo_tui.dataset_stats import Histogram
from epo_tui.dataset_text import JSONL, TEXT, Piece, TextSource, pieces
from epo_tui.engine import dataset_pass
from epo_tui.engine.dataset_pass import DatasetPass
from epo_tui.engine.sae import activations

TEXTS = ["The cat sat on the mat. " * 9, "A dog ran in the park, and the cat ran after it. " * 7, "short one",
         "Numbers 1 2 3 4 5 6 7 8 9 10 and more words to fill a row or two of the tiny model's context. " * 3]


def brute_force(pair, rows) -> np.ndarray:
    """Every latent's activation at every token (R x C x F), one forward over all rows at once, 0 where a
    statistic does not count (BOS, separators, padding)."""
    _, sae_in = pair.forward(jnp.asarray(rows.tokens_RxC), logits=False)
    acts = np.asarray(activations(pair.sae, sae_in), np.float64)
    return np.where(rows.countable_RxC[..., None], acts, 0.0)


def check_against_brute_force(pair, rows, state, top_k: int) -> None:
    acts_RxCxF = brute_force(pair, rows)
    d_sae = acts_RxCxF.shape[-1]
    # float32 round-off of a batch of B rows against all rows at once: relative to the largest activation
    # (a small one is a difference of large terms)
    atol = 1e-6 * max(1.0, float(acts_RxCxF.max()))
    np.testing.assert_allclose(dataset_pass.maxima(state), acts_RxCxF.max((0, 1)), rtol=1e-5, atol=atol)
    fires = (acts_RxCxF > 0).sum((0, 1))
    np.testing.assert_array_equal(state.fires_F, fires)
    np.testing.assert_array_equal(dataset_pass.density(state), fires / rows.countable_RxC.sum())
    assert state.tokens_counted == rows.countable_RxC.sum()
    np.testing.assert_array_equal(state.histogram_FxB.sum(1), fires)
    row_max_RxF = acts_RxCxF.max(1)
    best_FxK = np.argsort(-row_max_RxF, axis=0, kind="stable")[:top_k].T  # ties: the earlier row
    fired_FxK = np.take_along_axis(row_max_RxF.T, best_FxK, axis=1) > 0
    expected_rows = np.full((d_sae, top_k), -1)
    expected_rows[:, :best_FxK.shape[1]] = np.where(fired_FxK, best_FxK, -1)
    np.testing.assert_array_equal(np.asarray(state.top_row_FxK), expected_rows)
    top_acts = np.asarray(state.top_acts_FxKxC)
    for f in range(d_sae):
        for k in np.flatnonzero(expected_rows[f] >= 0):
            np.testing.assert_allclose(top_acts[f, k], acts_RxCxF[expected_rows[f, k], :, f], rtol=1e-5,
                                       atol=atol)


@pytest.fixture(scope="module")
def tiny_pass(tiny_pair):
    """(rows, the pass, its final state) over TEXTS in rows of 24 tokens, batches of 4, top 3."""
    rows = dataset_pass.dataset_rows(tiny_pair, [Piece(t, True) for t in TEXTS], context=24)
    job = DatasetPass(tiny_pair, rows, batch_rows=4)
    return rows, job, job.run(job.empty_state(3))


def test_the_pass_equals_a_brute_force_pass_on_the_tiny_model(tiny_pair, tiny_pass):
    rows, _, state = tiny_pass
    assert rows.rows > 5 and rows.rows % 4  # batches of 4 end with padding
    assert rows.documents == len(TEXTS)
    assert state.rows_done == rows.rows
    check_against_brute_force(tiny_pair, rows, state, 3)


def test_a_pass_stopped_and_resumed_from_its_arrays_ends_the_same(tiny_pass):
    _, job, whole = tiny_pass
    batches = iter(range(100))
    part = job.run(job.empty_state(3), should_stop=lambda: next(batches) >= 2)
    assert part.rows_done == 8
    resumed = job.run(dataset_pass.PassState.from_arrays(part.rows_done, part.tokens_counted, part.arrays()))
    for name, array in whole.arrays().items():
        np.testing.assert_array_equal(resumed.arrays()[name], array, err_msg=name)


def test_the_token_cap_and_what_never_counts(tiny_pair):
    rows = dataset_pass.dataset_rows(tiny_pair, [Piece(t, True) for t in TEXTS], context=24, max_tokens=30)
    assert rows.text_tokens == 30 and rows.text_RxC.sum() == 30 and rows.rows == 2  # BOS + 23, BOS + 7
    separator = tiny_pair.model.tokenizer.eos_token_id
    assert not rows.countable_RxC[rows.tokens_RxC == separator].any()
    assert not rows.countable_RxC[:, 0].any()
    with pytest.raises(Exception, match="--context"):
        dataset_pass.dataset_rows(tiny_pair, [Piece("x", True)], context=1000)
    with pytest.raises(Exception, match="no tokens"):
        dataset_pass.dataset_rows(tiny_pair, [Piece("", True), Piece("", True)], context=24)


def test_histogram_edges_and_the_stored_histogram(tiny_pair, tiny_pass):
    edges = dataset_pass.histogram_edges()
    assert edges[0] == 0 and edges[1] == pytest.approx(1e-3) and edges[-1] == pytest.approx(1e4)
    assert np.allclose(np.diff(np.log10(edges[1:])), 1 / 8)
    rows, job, state = tiny_pass
    counts_FxB, edges_FxE = dataset_pass.stored_histogram(state, job.edges_E)
    acts = brute_force(tiny_pair, rows)
    for f in np.flatnonzero(state.fires_F)[:10]:
        known = ~np.isnan(edges_FxE[f])
        histogram = Histogram(edges_FxE[f, known], counts_FxB[f, :known.sum() - 1])
        assert histogram.edges_E[-1] == pytest.approx(acts[..., f].max(), rel=1e-4)  # the last edge: the maximum
        assert histogram.percentile(float(histogram.edges_E[-1])) == 100.0
        positive = acts[..., f][acts[..., f] > 0]
        median = float(np.median(positive))
        assert abs(histogram.percentile(median) - 50.0) < 100 / 8 + 100 / len(positive)  # within a bin's share
    assert np.isnan(edges_FxE[state.fires_F == 0]).all()


def test_stored_examples_are_rows_without_bos_or_padding(tiny_pair, tiny_pass):
    rows, _, state = tiny_pass
    acts = brute_force(tiny_pair, rows)
    examples = dict(dataset_pass.latent_examples(tiny_pair, rows, state))
    assert set(examples) == set(np.flatnonzero(state.fires_F))
    f = next(iter(examples))
    row = int(state.top_row_FxK[f, 0])
    best = examples[f][0]
    in_text = rows.text_RxC[row]
    assert list(best.tokens) == tiny_pair.model.token_strings(rows.tokens_RxC[row][in_text].tolist())
    np.testing.assert_allclose(best.values, acts[row, in_text, f], rtol=1e-4, atol=1e-6)
    assert best.max_value == pytest.approx(acts[..., f].max(), rel=1e-4)
    trimmed = dict(dataset_pass.latent_examples(tiny_pair, rows, state, window=(2, 1), decimals=4))[f][0]
    assert len(trimmed.tokens) <= 4 and trimmed.max_value == pytest.approx(round(best.max_value, 4))


@pytest.mark.slow
def test_the_pass_equals_a_brute_force_pass_on_the_demo():
    from epo_tui.config import load_config
    from epo_tui.engine.pairing import load_model_with_sae

    pair = load_model_with_sae(load_config(str(paths.demo_config_file())))
    heldout = [TextSource(paths.demo_pack() / "heldout.jsonl", JSONL)]
    rows = dataset_pass.dataset_rows(pair, pieces(heldout), context=128, max_tokens=4500)
    assert rows.rows == 36  # 4500 tokens in rows of 127: batches of 8 end with padding
    job = DatasetPass(pair, rows, batch_rows=8)
    state = job.run(job.empty_state(5))
    check_against_brute_force(pair, rows, state, 5)


def test_text_files_are_one_document_each(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\n" * 20000, encoding="utf-8")
    read = list(pieces([TextSource(path, TEXT)]))
    assert "".join(p.text for p in read) == path.read_text() and [p.ends_document for p in read][-1]
    assert sum(p.ends_document for p in read) == 1 and len(read) > 1

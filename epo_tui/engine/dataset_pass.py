"""A local dataset pass (`epo-tui dataset`): text through the model and SAE in batches of rows, keeping per
latent what `epo_tui.dataset_stats` stores, without ever holding every activation.

Rows are the project's held-out rows (`text_rows`): the documents' ids joined by an end-of-text separator,
cut into rows of BOS + C-1 tokens (the last one padded). Only the countable positions count (`countable`:
not BOS, not padding, not a separator or any other special token); elsewhere an activation reads 0.

What a pass keeps (`PassState`), F latents, K examples, C tokens a row, B histogram bins:
- `top_value_FxK`, `top_row_FxK`, `top_acts_FxKxC`: each latent's K best rows by the row's maximum, best
  first (ties: the earlier row), and the latent's activation at each token of those rows. A batch's
  candidates are its rows' per-latent maxima; they merge into the running top-K in one vectorized step, and
  only the (row, latent) pairs that enter a top-K have their token activations copied in. Memory is
  F x K x C floats whatever the number of rows (24,576 latents x 20 x 128: 252 MB). A row enters only
  where the latent fires in it (maximum > 0). The maximum of latent f and its context: slot 0.
- `fires_F`: countable tokens where the latent fires (activation > 0); density = fires_F / tokens_counted.
- `histogram_FxB`: countable tokens where it fires, per bin of `histogram_edges()`: bin 0 is (0, LOW), then
  BINS_PER_DECADE log-spaced bins per decade from LOW up to HIGH (activation a > 0 goes to bin
  floor(BINS_PER_DECADE * log10(a / LOW)) + 1, clipped); activations past HIGH fall in the last bin. One set of edges for every latent, fixed before the pass, so batches add up exactly and a resumed
  pass equals an uninterrupted one; log spacing gives every latent, whatever its scale (0.01 or 500),
  bins of the same relative width (1/8 decade: 33%). As Neuronpedia's histograms, zeros are left out
  (the density says how many). When stored, each latent's edges end at its own maximum (`stored_histogram`).

Shapes: R rows, C tokens a row (the context), B a batch's rows, D the SAE's input width, F latents.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from epo_tui.dataset_stats import Example
from epo_tui.dataset_text import Piece
from epo_tui.engine import sharding
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.sae import activations
from epo_tui.engine.text_rows import countable, pack_rows
from epo_tui.errors import UserError

DEFAULT_TOP_K = 20
DEFAULT_CONTEXT = 128
DEFAULT_BATCH_ROWS = 16
HISTOGRAM_LOW, HISTOGRAM_HIGH, BINS_PER_DECADE = 1e-3, 1e4, 8
TOKENIZE_PIECES = 64  # pieces of text tokenized in one call


def histogram_edges(low: float = HISTOGRAM_LOW, high: float = HISTOGRAM_HIGH,
                    per_decade: int = BINS_PER_DECADE) -> np.ndarray:
    """The E ascending edges of the pass's histogram bins, in activation units: 0, then `per_decade`
    log-spaced edges per decade from `low` to `high` (float64)."""
    decades = math.log10(high / low)
    count = round(decades * per_decade)
    return np.concatenate([[0.0], low * 10.0 ** (np.arange(count + 1) / per_decade)])


@dataclass(frozen=True)
class DatasetRows:
    """The pass's input: `tokens_RxC` (int32) with `text_RxC` (True at the text's tokens and separators:
    not at BOS or padding) and `countable_RxC` (True where a statistic counts). `text_tokens`: the
    stream's tokens (text and separators; what --tokens caps), `documents`: documents read whole or in part."""

    tokens_RxC: np.ndarray
    text_RxC: np.ndarray
    countable_RxC: np.ndarray
    text_tokens: int
    documents: int

    @property
    def rows(self) -> int:
        return int(self.tokens_RxC.shape[0])

    @property
    def context(self) -> int:
        return int(self.tokens_RxC.shape[1])


def dataset_rows(pair: ModelWithSAE, pieces: Iterable[Piece], context: int, max_tokens: int | None = None
                 ) -> DatasetRows:
    """The documents of `pieces` as rows of `context` tokens (BOS + context-1), at most `max_tokens` stream
    tokens (None: all). UserError for a context the model cannot read, or text with no countable token."""
    model = pair.model
    limit = model.cfg.max_positions
    if not 2 <= context <= limit:
        raise UserError(f"--context: must be 2..{limit} (the model reads at most {limit} tokens), found {context}")
    tokenizer = model.tokenizer
    bos = model.bos_id
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    chunks: list[np.ndarray] = []
    total = documents = 0
    in_document = False  # the last piece read ended inside a document
    for batch in _batched(pieces, TOKENIZE_PIECES):
        ids = tokenizer([p.text for p in batch], add_special_tokens=False)["input_ids"]
        for piece, piece_ids in zip(batch, ids, strict=True):
            if max_tokens is not None and total >= max_tokens:
                break
            documents += not in_document
            in_document = not piece.ends_document
            stream = [*piece_ids, separator] if piece.ends_document else piece_ids
            if max_tokens is not None:
                stream = stream[:max_tokens - total]
            chunks.append(np.asarray(stream, np.int32))
            total += len(stream)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    tokens, text = pack_rows(stream, context, bos)
    counted = countable(tokens, text, model.special_token_ids())
    if not counted.any():
        raise UserError("dataset: the text holds no tokens to measure (empty, or only special tokens)")
    return DatasetRows(tokens, text, counted, int(len(stream)), documents)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class PassState:
    """A pass so far (see the module docstring): the first `rows_done` rows are in it. The top-K arrays
    are jax arrays on the pass's devices; the counts numpy int64 on the host."""

    rows_done: int
    tokens_counted: int
    fires_F: np.ndarray
    histogram_FxB: np.ndarray
    top_value_FxK: jax.Array
    top_row_FxK: jax.Array
    top_acts_FxKxC: jax.Array

    @classmethod
    def empty(cls, d_sae: int, top_k: int, context: int, bins: int) -> PassState:
        return cls(0, 0, np.zeros(d_sae, np.int64), np.zeros((d_sae, bins), np.int64),
                   jnp.full((d_sae, top_k), -jnp.inf, jnp.float32), jnp.full((d_sae, top_k), -1, jnp.int32),
                   jnp.zeros((d_sae, top_k, context), jnp.float32))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array on the host, by name (what a checkpoint holds)."""
        return {"fires_F": self.fires_F, "histogram_FxB": self.histogram_FxB,
                "top_value_FxK": np.asarray(self.top_value_FxK), "top_row_FxK": np.asarray(self.top_row_FxK),
                "top_acts_FxKxC": np.asarray(self.top_acts_FxKxC)}

    @classmethod
    def from_arrays(cls, rows_done: int, tokens_counted: int, arrays: dict[str, np.ndarray]) -> PassState:
        return cls(rows_done, tokens_counted, arrays["fires_F"].astype(np.int64),
                   arrays["histogram_FxB"].astype(np.int64), jnp.asarray(arrays["top_value_FxK"], jnp.float32),
                   jnp.asarray(arrays["top_row_FxK"], jnp.int32), jnp.asarray(arrays["top_acts_FxKxC"], jnp.float32))

    def fits(self, d_sae: int, top_k: int, context: int, bins: int) -> bool:
        """Whether the arrays have the shapes of a pass of these sizes (a checkpoint of another pass does not)."""
        return (self.fires_F.shape == (d_sae,) and self.histogram_FxB.shape == (d_sae, bins)
                and self.top_value_FxK.shape == (d_sae, top_k) and self.top_row_FxK.shape == (d_sae, top_k)
                and self.top_acts_FxKxC.shape == (d_sae, top_k, context))


@functools.partial(jax.jit, static_argnames=("low", "per_decade", "bins"))
def _fold_batch(sae, sae_in_BxCxD, countable_BxC, row_B, top_value_FxK, top_row_FxK, top_acts_FxKxC, *,
                low: float, per_decade: int, bins: int):
    """One batch merged into the running top-K; also its histogram counts per latent (int32 FxB, for the
    caller to add up). `row_B`: each batch row's index in the pass (-1: padding)."""
    acts_BxCxF = activations(sae, sae_in_BxCxD).astype(jnp.float32)
    acts_BxCxF = jnp.where(countable_BxC[..., None], acts_BxCxF, 0.0)
    n_latents = acts_BxCxF.shape[-1]
    # the bin of `histogram_edges`, from the logarithm (a binary search over the edges is 10x slower on CPU)
    bin_BxCxF = jnp.clip(jnp.floor(jnp.log10(acts_BxCxF / low) * per_decade).astype(jnp.int32) + 1, 0, bins - 1)
    cell = (jnp.arange(n_latents, dtype=jnp.int32) * bins + bin_BxCxF).ravel()
    histogram_FxB = jnp.zeros(n_latents * bins, jnp.int32).at[cell].add(
        (acts_BxCxF > 0).ravel().astype(jnp.int32)).reshape(n_latents, bins)

    top_k = top_value_FxK.shape[1]
    row_max_BxF = acts_BxCxF.max(1)
    candidate_FxB = jnp.where((row_max_BxF > 0) & (row_B[:, None] >= 0), row_max_BxF, -jnp.inf).T
    merged_value = jnp.concatenate([top_value_FxK, candidate_FxB], axis=1)
    merged_row = jnp.concatenate([top_row_FxK, jnp.broadcast_to(row_B, candidate_FxB.shape)], axis=1)
    value_FxK, pick_FxK = jax.lax.top_k(merged_value, top_k)  # ties: the lower index, the earlier row
    row_FxK = jnp.take_along_axis(merged_row, pick_FxK, axis=1)
    merged_acts = jnp.concatenate([top_acts_FxKxC, acts_BxCxF.transpose(2, 0, 1)], axis=1)  # F x (K+B) x C
    acts_FxKxC = jax.vmap(lambda acts_MxC, pick_K: acts_MxC[pick_K])(merged_acts, pick_FxK)
    empty_FxK = value_FxK == -jnp.inf
    row_FxK = jnp.where(empty_FxK, -1, row_FxK)
    acts_FxKxC = jnp.where(empty_FxK[..., None], 0.0, acts_FxKxC)
    return value_FxK, row_FxK, acts_FxKxC, histogram_FxB


class DatasetPass:
    """Runs rows through the model and SAE `batch_rows` at a time (rounded up to a multiple of the mesh's
    data devices: rows are split along "data"), folding each batch into a `PassState`."""

    def __init__(self, pair: ModelWithSAE, rows: DatasetRows, batch_rows: int = DEFAULT_BATCH_ROWS,
                 histogram: tuple[float, float, int] = (HISTOGRAM_LOW, HISTOGRAM_HIGH, BINS_PER_DECADE)):
        self.pair, self.rows = pair, rows
        self.mesh = pair.mesh
        data = sharding.data_size(self.mesh)
        self.batch_rows = -(-max(1, batch_rows) // data) * data
        self.histogram = tuple(histogram)
        self.edges_E = histogram_edges(*histogram)
        self._split = NamedSharding(self.mesh, PartitionSpec(sharding.DATA))

    @property
    def bins(self) -> int:
        return len(self.edges_E) - 1

    def empty_state(self, top_k: int) -> PassState:
        return PassState.empty(self.pair.sae.d_sae, top_k, self.rows.context, self.bins)

    def step(self, state: PassState) -> tuple[PassState, int]:
        """The next batch of rows folded in: (the new state, the stream tokens it read)."""
        start = state.rows_done
        stop = min(start + self.batch_rows, self.rows.rows)
        tokens_BxC = _padded(self.rows.tokens_RxC[start:stop], self.batch_rows)
        countable_BxC = _padded(self.rows.countable_RxC[start:stop], self.batch_rows)
        row_B = np.full(self.batch_rows, -1, np.int32)
        row_B[:stop - start] = np.arange(start, stop, dtype=np.int32)
        _, sae_in_BxCxD = self.pair.forward(jax.device_put(jnp.asarray(tokens_BxC), self._split), logits=False)
        value, row, acts, histogram_FxB = _fold_batch(
            self.pair.sae, sae_in_BxCxD, jnp.asarray(countable_BxC), jnp.asarray(row_B), state.top_value_FxK,
            state.top_row_FxK, state.top_acts_FxKxC, low=float(self.histogram[0]), per_decade=int(self.histogram[2]),
            bins=self.bins)
        histogram_FxB = jax.device_get(histogram_FxB)
        fires_F = histogram_FxB.sum(1)  # every activation > 0 is in some bin
        read = int(self.rows.text_RxC[start:stop].sum())
        return PassState(stop, state.tokens_counted + int(countable_BxC.sum()), state.fires_F + fires_F,
                         state.histogram_FxB + histogram_FxB, value, row, acts), read

    def run(self, state: PassState, should_stop: Callable[[], bool] = lambda: False,
            on_batch: Callable[[PassState, int, float], None] = lambda state, read, seconds: None) -> PassState:
        """Batches until every row is in or `should_stop()` (asked before each batch). `on_batch(state,
        stream tokens read, seconds)` after each (it may save a checkpoint)."""
        while state.rows_done < self.rows.rows and not should_stop():
            started = time.perf_counter()
            state, read = self.step(state)
            on_batch(state, read, time.perf_counter() - started)
        return state


def _padded(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with zero rows appended up to `rows` (one shape, one compilation)."""
    missing = rows - len(array)
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)]) if missing else array


# ----------------------------------------------------------------------------------------------
# What a finished pass stores


def density(state: PassState) -> np.ndarray:
    """Each latent's firing density (0..1), float64 F."""
    return state.fires_F / max(1, state.tokens_counted)


def maxima(state: PassState) -> np.ndarray:
    """Each latent's largest activation over the countable tokens, float64 F: 0 for a latent that never fired."""
    top = np.asarray(state.top_value_FxK[:, 0], np.float64)
    return np.where(np.isfinite(top), top, 0.0)


def stored_histogram(state: PassState, edges_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts_FxB, edges_FxE) as `dataset_stats` stores them: each latent keeps the bins up to the one
    holding its maximum, whose upper edge becomes the maximum (the pass's last bin is open-ended); the
    rest are NaN edges and zero counts. A latent that never fired has no histogram (all NaN)."""
    d_sae, bins = state.histogram_FxB.shape
    counts_FxB = np.zeros((d_sae, bins), np.float64)
    edges_FxE = np.full((d_sae, bins + 1), np.nan)
    top_F = maxima(state)
    for f in np.flatnonzero(state.fires_F > 0):
        used = int(np.flatnonzero(state.histogram_FxB[f])[-1]) + 1
        counts_FxB[f, :used] = state.histogram_FxB[f, :used]
        edges_FxE[f, :used + 1] = edges_E[:used + 1]
        edges_FxE[f, used] = max(top_F[f], edges_E[used - 1])
    return counts_FxB, edges_FxE


def latent_examples(pair: ModelWithSAE, rows: DatasetRows, state: PassState, window: tuple[int, int] | None = None,
                    decimals: int | None = None) -> Iterator[tuple[int, list[Example]]]:
    """(latent, its examples best first) for every latent with one, in index order: each example a row of
    the text (BOS and padding left out), its tokens as shown everywhere (`token_strings`) and the latent's
    activation at each (0 at separators). `window` (before, after): only that many tokens either side of
    the example's maximum (the demo pack keeps its files small); `decimals`: values rounded so."""
    row_FxK = np.asarray(state.top_row_FxK)
    acts_FxKxC = np.asarray(state.top_acts_FxKxC)
    shown = _TokenStrings(pair.model)
    for f in np.flatnonzero(row_FxK[:, 0] >= 0):
        examples = []
        for k in np.flatnonzero(row_FxK[f] >= 0):
            row = int(row_FxK[f, k])
            in_text = rows.text_RxC[row]
            tokens = shown(rows.tokens_RxC[row][in_text])
            values = acts_FxKxC[f, k][in_text].astype(np.float64)
            if window is not None:
                peak = int(np.argmax(values))
                low, high = max(0, peak - window[0]), peak + window[1] + 1
                tokens, values = tokens[low:high], values[low:high]
            if decimals is not None:
                values = np.round(values, decimals)
            examples.append(Example.of(tokens, values.tolist()))
        yield int(f), examples


class _TokenStrings:
    """Ids as shown (`LanguageModel.token_strings`, which shows each id on its own), each id worked out once."""

    def __init__(self, model):
        self.model, self.known = model, {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        missing = sorted({int(i) for i in ids} - self.known.keys())
        if missing:
            self.known.update(zip(missing, self.model.token_strings(missing), strict=True))
        return [self.known[int(i)] for i in ids]

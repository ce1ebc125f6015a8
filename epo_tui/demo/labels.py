"""Automatic labels for the demo SAE's latents, from their top-activating snippets of the train split.

Why automatic: the pack is built offline, with no language model to write explanations, yet a
researcher picking a latent from a list needs a hint of what it does. Each label names the (up to 3)
most frequent tokens among the latent's top 20 activations, then one snippet of whole words around its
single strongest activation, within one paragraph, the firing token in brackets, in at most 80
characters: `"file", "files", "directory" — e.g. "the [file] must"`. Strings are JSON-quoted, so a
newline token reads "\\n".

Data: every row of the train split (never held-out), packed as the LM was trained (BOS + 127 tokens of
the document stream, `train_lm.token_stream` + `text_rows.pack_rows`), run through the model and SAE as the search
pairs them (`load_model_with_sae`). The BOS position and padding are skipped. All 13,144 rows (1.67M
positions) take 76-82 s on the idle 2-core build machine (123 s with another job running), within
the ~90 s budget, so no subset is drawn.

Memory: only each latent's top TOP_K activations and their positions are kept, merged batch by batch
(positions x latents for one batch at a time, never for the whole corpus).

Output: OUT/labels/explanations.jsonl, one Neuronpedia-style explanation per latent, index order.
Deterministic: ties go to the earlier position, token ties to the stronger activation.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TOP_K = 20  # activations kept per latent
BATCH_ROWS = 64  # rows per forward pass (64 x 128 positions x 2048 latents = 67 MB of float32)
MAX_CHARS = 80  # a description fits a one-line list
TOKENS_SHOWN = 3
# (tokens before, tokens after) the firing one in the snippet, widest first, narrowed until it fits
SNIPPET_WIDTHS = ((6, 3), (5, 2), (4, 2), (3, 1), (2, 1), (1, 1), (1, 0), (0, 0))
DEFAULT_MODEL_ID = "epo-tui-demo-gpt2"
TYPE_NAME = "epo-tui-automatic-top-activations"
EXPLAINER = "none (automatic, from top-activating snippets)"
NEVER_FIRES = "(never fires on the train text)"


@dataclass
class TopActivations:
    """Each latent's strongest activations over the rows, strongest first.

    values_SxK: activations, where <= 0 means the latent did not fire there (-1: no position at all);
    positions_SxK: flat position row * C + column into the rows' token matrix.
    """

    values_SxK: np.ndarray
    positions_SxK: np.ndarray


def build_labels(out: Path, log=print) -> dict:
    """OUT/model + OUT/sae + OUT/corpus/train.jsonl -> OUT/labels/explanations.jsonl; returns stats."""
    from epo_tui.demo.corpus import read_split
    from epo_tui.labels import write_explanations

    start = time.perf_counter()
    pair = load_pair(out)
    tokens_NxC, valid_NxC = train_rows(pair, read_split(out / "corpus" / "train.jsonl"))
    log(f"labels: {len(tokens_NxC):,} train rows, {int(valid_NxC.sum()):,} positions")
    started_activations = time.perf_counter()
    top = top_activations(pair, tokens_NxC, valid_NxC)
    activation_seconds = time.perf_counter() - started_activations
    records = explanation_records(pair, top, tokens_NxC)
    path = out / "labels" / "explanations.jsonl"
    write_explanations(path, records)
    path.chmod(0o644)  # part of the pack, like the model and SAE files
    never_fired = int((top.values_SxK[:, 0] <= 0).sum())
    stats = {"latents": len(records), "never_fired": never_fired, "rows": len(tokens_NxC),
             "positions": int(valid_NxC.sum()), "activation_seconds": round(activation_seconds, 1),
             "seconds": round(time.perf_counter() - start, 1)}
    log(f"labels: {stats['latents']} latents labelled ({never_fired} never fired) in {stats['seconds']:.0f}s "
        f"({stats['activation_seconds']:.0f}s for the top activations) -> {path}")
    return stats


def load_pair(out: Path):
    """The demo model and SAE exactly as the search loads them."""
    from epo_tui.config import Config, ModelConfig, SAEConfig
    from epo_tui.engine.pairing import load_model_with_sae

    config = dataclasses.replace(Config(), model=ModelConfig(name=None, path=str(out / "model")),
                                 sae=SAEConfig(path=str(out / "sae")))
    return load_model_with_sae(config)


def train_rows(pair, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens NxC, valid NxC) packed as the LM was trained; BOS, padding and the end-of-text tokens
    between documents not valid (no prompt can hold them)."""
    from epo_tui.demo.train_lm import token_stream
    from epo_tui.engine.text_rows import countable, pack_rows

    tokenizer = pair.model.tokenizer
    tokens, valid = pack_rows(token_stream(tokenizer, texts), pair.model.cfg.max_positions, tokenizer.bos_token_id)
    return tokens, countable(tokens, valid, pair.model.special_token_ids())


def top_activations(pair, tokens_NxC: np.ndarray, valid_NxC: np.ndarray, k: int = TOP_K,
                    batch_rows: int = BATCH_ROWS) -> TopActivations:
    """Every latent's top k activations over the valid positions, streamed batch by batch."""
    from epo_tui.engine.sae import activations

    n_rows, context = tokens_NxC.shape
    d_sae = pair.sae.d_sae

    @jax.jit
    def merge_batch(sae, sae_in_BxCxD, valid_BxC, first_position, best_values_SxK, best_positions_SxK):
        acts_PxS = activations(sae, sae_in_BxCxD).reshape(-1, d_sae)
        acts_PxS = jnp.where(valid_BxC.reshape(-1, 1), acts_PxS, -1.0)
        values_SxK, local_SxK = jax.lax.top_k(acts_PxS.T, k)
        # earlier batches first: top_k keeps the lower index on ties, so the earlier position wins
        all_values = jnp.concatenate([best_values_SxK, values_SxK], axis=1)
        all_positions = jnp.concatenate([best_positions_SxK, first_position + local_SxK], axis=1)
        values_SxK, pick_SxK = jax.lax.top_k(all_values, k)
        return values_SxK, jnp.take_along_axis(all_positions, pick_SxK, axis=1)

    best_values = jnp.full((d_sae, k), -1.0, jnp.float32)
    best_positions = jnp.zeros((d_sae, k), jnp.int32)
    for first in range(0, n_rows, batch_rows):
        tokens, valid = tokens_NxC[first:first + batch_rows], valid_NxC[first:first + batch_rows]
        if len(tokens) < batch_rows:  # one shape, one compilation: pad with invalid rows
            pad = batch_rows - len(tokens)
            tokens = np.concatenate([tokens, np.zeros((pad, context), tokens.dtype)])
            valid = np.concatenate([valid, np.zeros((pad, context), bool)])
        _, sae_in = pair.forward(jnp.asarray(tokens), logits=False)
        best_values, best_positions = merge_batch(pair.sae, sae_in, jnp.asarray(valid),
                                                  jnp.int32(first * context), best_values, best_positions)
    return TopActivations(values_SxK=np.asarray(best_values), positions_SxK=np.asarray(best_positions))


def explanation_records(pair, top: TopActivations, tokens_NxC: np.ndarray) -> list[dict]:
    """One Neuronpedia-style explanation per latent, in index order."""
    from epo_tui.demo.train_sae import demo_neuronpedia_id

    model, sae = pair.model, pair.sae
    # the SAE's own Neuronpedia id, so the labels pass the check against it (labels.read_export)
    np_id = sae.neuronpedia_id or demo_neuronpedia_id(sae.model_name or DEFAULT_MODEL_ID, sae.hook_name)
    model_id, _, layer = np_id.partition("/")
    vocabulary = Vocabulary.of(model)
    records = []
    for index in range(sae.d_sae):
        description = describe(top.values_SxK[index], top.positions_SxK[index], tokens_NxC, vocabulary)
        records.append({"modelId": model_id, "layer": layer, "index": str(index),
                        "description": description, "typeName": TYPE_NAME,
                        "explanationModelName": EXPLAINER, "automatic": True})
    return records


@dataclass(frozen=True)
class Vocabulary:
    """How token ids read: each id alone, a run of ids, and which ids end a paragraph or document."""

    strings: list[str]  # each id decoded on its own, spaces kept
    decode: Callable[[np.ndarray], str]
    boundary_ids: frozenset[int]  # a snippet never reaches past these

    @classmethod
    def of(cls, model) -> Vocabulary:
        strings = model.token_strings(range(len(model.tokenizer)))
        # documents end with a special token, paragraphs with "\n"
        boundaries = {int(i) for i in model.special_token_ids()}
        boundaries.update(i for i, text in enumerate(strings) if "\n" in text)
        return cls(strings=strings, decode=model.decode, boundary_ids=frozenset(boundaries))

    def joins_word(self, left_id: int, right_id: int) -> bool:
        """Whether right_id continues the word left_id ends (no space or punctuation between)."""
        return self.strings[left_id][-1:].isalnum() and self.strings[right_id][:1].isalnum()


def describe(values_K: np.ndarray, positions_K: np.ndarray, tokens_NxC: np.ndarray, vocabulary: Vocabulary) -> str:
    """`"tok", "tok2" — e.g. "context [tok] more"` from one latent's top activations (strongest first)."""
    firing = values_K > 0
    if not firing.any():
        return NEVER_FIRES
    rows, columns = np.divmod(positions_K[firing], tokens_NxC.shape[1])
    shown = [display_token(vocabulary.strings[tokens_NxC[r, c]]) for r, c in zip(rows, columns)]
    # most frequent first; equal counts in order of first (strongest) appearance: Counter keeps it
    frequent = [text for text, _ in Counter(shown).most_common(TOKENS_SHOWN)]
    row, column = tokens_NxC[rows[0]], int(columns[0])
    text = ""
    for n_tokens in range(len(frequent), 0, -1):  # a shorter snippet first, then fewer tokens
        quoted = ", ".join(json.dumps(t, ensure_ascii=False) for t in frequent[:n_tokens])
        for before, after in SNIPPET_WIDTHS:
            snippet = marked_snippet(row, column, before, after, vocabulary)
            text = f"{quoted} — e.g. {json.dumps(snippet, ensure_ascii=False)}"
            if len(text) <= MAX_CHARS:
                return text
    return text[:MAX_CHARS - 1] + "…"


def display_token(text: str) -> str:
    """A token as a list shows it: surrounding whitespace trimmed, unless it is all whitespace."""
    return text.strip() or text


def marked_snippet(row_C: np.ndarray, column: int, before: int, after: int, vocabulary: Vocabulary) -> str:
    """The text of up to `before` and `after` tokens around row_C[column], that token in [brackets].

    The context stops before a boundary token (a firing boundary token itself, e.g. "\\n", keeps the
    text on both sides) and shows whole words: a word cut by the window is left out.
    """
    ids = [int(i) for i in row_C]
    start = column
    while start > 1 and column - start < before and ids[start - 1] not in vocabulary.boundary_ids:
        start -= 1
    while start < column and vocabulary.joins_word(ids[start - 1], ids[start]):
        start += 1
    end = column + 1
    while end < len(ids) and end - column - 1 < after and ids[end] not in vocabulary.boundary_ids:
        end += 1
    while end > column + 1 and end < len(ids) and vocabulary.joins_word(ids[end - 1], ids[end]):
        end -= 1
    token = vocabulary.strings[ids[column]]
    core = display_token(token)
    lead, trail = ("", "") if core == token else (token[:len(token) - len(token.lstrip())],
                                                  token[len(token.rstrip()):])
    left, right = vocabulary.decode(ids[start:column]), vocabulary.decode(ids[column + 1:end])
    return (left + lead + f"[{core}]" + trail + right).strip()

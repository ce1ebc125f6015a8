"""Documents as model input rows: their ids joined by an end-of-text token, cut into rows of BOS +
C-1 tokens. The demo LM trained on such rows; its SAE, its labels and the quality benchmark read
text the same way, so position 0 is always BOS, as the search lays prompts out."""

from __future__ import annotations

import math

import numpy as np


def token_stream(tokenizer, texts: list[str], separator_id: int) -> np.ndarray:
    """Every text's ids, each followed by `separator_id`, as one int32 stream."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.fromiter((t for doc in ids for t in (*doc, separator_id)), dtype=np.int32)


def pack_rows(stream: np.ndarray, context: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens NxC, mask NxC): rows are BOS + the next C-1 stream tokens (the last row padded); the
    mask is False at BOS and at padding."""
    body = context - 1
    n = max(1, math.ceil(len(stream) / body))
    padded = np.full(n * body, bos, dtype=np.int32)
    padded[:len(stream)] = stream
    valid = np.zeros(n * body, dtype=bool)
    valid[:len(stream)] = True
    tokens = np.concatenate([np.full((n, 1), bos, np.int32), padded.reshape(n, body)], axis=1)
    mask = np.concatenate([np.zeros((n, 1), bool), valid.reshape(n, body)], axis=1)
    return tokens, mask


def countable(tokens_NxC: np.ndarray, mask_NxC: np.ndarray, special_ids) -> np.ndarray:
    """The mask less every special token (document separators, BOS, pad): the positions a dataset
    statistic (maximum, top examples, alive count) may count, since no prompt can hold those tokens."""
    return mask_NxC & ~np.isin(tokens_NxC, np.asarray(special_ids, np.int64))

"""Scoring a text: per-token activation of one SAE latent and per-token cross-entropy."""

from __future__ import annotations

import jax
import numpy as np

from epo_tui.engine.pairing import ModelWithSAE, as_batch
from epo_tui.engine.sae import activations
from epo_tui.errors import UserError, require_utf8
from epo_tui.text import token_text


def score_text(pair: ModelWithSAE, text: str, feature: int, prefix: str = "") -> dict:
    """{"tokens", "token_bytes", "token_ids", "activations", "xent", "prompt_start"} for BOS + prefix + text.

    tokens[i] is token i as shown (`LanguageModel.token_strings`: a byte that is only part of a UTF-8
    character as `\\xNN`); token_bytes[i] its raw bytes in hex (all joined: the UTF-8 of the decoded ids);
    activations[i] is the latent's true activation (as sae-lens computes it) at token i;
    xent[i] is -log p(token i | tokens before it), None for the first token. The text's own tokens
    start at `prompt_start`: only they count in a maximum or a colour scale (`epo_tui.scored`), as
    only they are what a search can change. Raises UserError for an empty text, one that is not
    UTF-8, one that spells a special token, or one past the model's context.
    """
    if not text:
        raise UserError("the text to score is empty")
    require_utf8(text, "the text to score")
    model = pair.model
    prefix_ids = model.encode("", prefix)  # BOS + prefix, tokenized once
    prompt_start = len(prefix_ids)
    ids = prefix_ids + model.prompt_ids(text)
    limit = model.cfg.max_positions
    if len(ids) > limit:
        raise UserError(f"the text is {len(ids)} tokens with BOS and prefix; the model reads at most {limit}")
    logits_1xLxV, sae_in_1xLxD = pair.forward(as_batch(ids))
    acts_L = np.asarray(activations(pair.sae, sae_in_1xLxD[0])[:, feature], dtype=np.float64)
    logprobs_LxV = np.asarray(jax.nn.log_softmax(logits_1xLxV[0], axis=-1), dtype=np.float64)
    xent = [None] + [float(-logprobs_LxV[i - 1, ids[i]]) for i in range(1, len(ids))]
    raw = model.token_bytes(ids)
    return {"tokens": [token_text(b) for b in raw], "token_bytes": [b.hex() for b in raw], "token_ids": ids,
            "activations": [float(a) for a in acts_L], "xent": xent, "prompt_start": prompt_start}

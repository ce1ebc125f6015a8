"""Scoring a text: per-token activation of one SAE latent and per-token cross-entropy."""

from __future__ import annotations

import jax
import numpy as np

from epo_tui.engine.pairing import ModelWithSAE, as_batch
from epo_tui.engine.sae import activations
from epo_tui.errors import UserError, require_utf8
from epo_tui.text import token_text


def score_text(pair: ModelWithSAE, text: str, feature: int, prefix: str = "", top_features: int = 0) -> dict:
    """{"tokens", "token_bytes", "token_ids", "activations", "xent", "prompt_start"} for BOS + prefix + text.

    tokens[i] is token i as shown (`LanguageModel.token_strings`: a byte that is only part of a UTF-8
    character as `\\xNN`); token_bytes[i] its raw bytes in hex (all joined: the UTF-8 of the decoded ids);
    activations[i] is the latent's true activation (as sae-lens computes it) at token i;
    xent[i] is -log p(token i | tokens before it), None for the first token. The text's own tokens
    start at `prompt_start`: only they count in a maximum or a colour scale (`epo_tui.scored`), as
    only they are what a search can change. With `top_features` > 0, "top_features" lists the latents
    firing most on the text's own tokens (at most that many, act > 0 only, strongest first), each
    {"index", "act", "position"}: the view from the prompt to the features. Raises UserError for an empty text, one that is not
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
    acts_LxF = activations(pair.sae, sae_in_1xLxD[0])
    acts_L = np.asarray(acts_LxF[:, feature], dtype=np.float64)
    logprobs_LxV = np.asarray(jax.nn.log_softmax(logits_1xLxV[0], axis=-1), dtype=np.float64)
    xent = [None] + [float(-logprobs_LxV[i - 1, ids[i]]) for i in range(1, len(ids))]
    raw = model.token_bytes(ids)
    scored = {"tokens": [token_text(b) for b in raw], "token_bytes": [b.hex() for b in raw], "token_ids": ids,
              "activations": [float(a) for a in acts_L], "xent": xent, "prompt_start": prompt_start}
    if top_features > 0:
        scored["top_features"] = strongest_latents(np.asarray(acts_LxF[prompt_start:], dtype=np.float64),
                                                   top_features, offset=prompt_start)
    return scored


def strongest_latents(acts_LxF: np.ndarray, k: int, offset: int = 0) -> list[dict]:
    """The (at most) `k` latents with the largest activation anywhere in `acts_LxF`, strongest first,
    only those that fire (act > 0): {"index", "act", "position" (its row + `offset`)}; ties by index."""
    peak_F = acts_LxF.max(axis=0) if acts_LxF.shape[0] else np.zeros(acts_LxF.shape[1])
    firing = np.flatnonzero(peak_F > 0)
    order = firing[np.lexsort((firing, -peak_F[firing]))][:k]
    return [{"index": int(f), "act": float(peak_F[f]), "position": int(acts_LxF[:, f].argmax()) + offset}
            for f in order]

"""The latents firing most on a scored text (the scratchpad's prompt-to-features view): the strongest
latents of the SAE over the text's own tokens, checked latent by latent against `score_text` itself."""

from __future__ import annotations

import numpy as np

from epo_tui.engine.scoring import score_text, strongest_latents

TEXT = "The quick brown fox jumps over the lazy dog"


def test_strongest_latents_are_the_largest_maxima_that_fire():
    acts_LxF = np.array([[0.0, 2.0, -1.0, 5.0], [3.0, 2.0, 0.0, 1.0]])
    assert strongest_latents(acts_LxF, 3, offset=10) == [
        {"index": 3, "act": 5.0, "position": 10}, {"index": 0, "act": 3.0, "position": 11},
        {"index": 1, "act": 2.0, "position": 10}]
    assert strongest_latents(acts_LxF, 9) == strongest_latents(acts_LxF, 3)  # latent 2 never fires
    assert strongest_latents(np.zeros((0, 4)), 3) == []


def test_the_top_features_of_a_text_are_each_latents_own_maximum(tiny_pair):
    scored = score_text(tiny_pair, TEXT, 0, top_features=5)
    start = scored["prompt_start"]
    maxima = []
    for latent in range(int(tiny_pair.sae.d_sae)):
        acts = score_text(tiny_pair, TEXT, latent)["activations"][start:]
        maxima.append((max(acts), latent, start + int(np.argmax(acts))))
    expected = sorted((m for m in maxima if m[0] > 0), key=lambda m: (-m[0], m[1]))[:5]
    assert [(t["index"], t["position"]) for t in scored["top_features"]] == [(i, p) for _, i, p in expected]
    np.testing.assert_allclose([t["act"] for t in scored["top_features"]], [a for a, _, _ in expected], rtol=1e-6)
    assert "top_features" not in score_text(tiny_pair, TEXT, 0)  # only when asked: `score --json` is unchanged

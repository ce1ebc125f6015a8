"""What counts in the summary of a scored text (`epo-tui score`, the `scored` event, the scratchpad).

Only the text's own tokens count, from `prompt_start` on: BOS, the prefix and their special tokens
are laid out before it, and no search can change them, so a latent that fires on `<|endoftext|>`
must not make the text look active. The CLI and the UI both summarise through here, so they agree.

Plain Python, shared by the CLI and the UI.
"""

from __future__ import annotations

import math


def prompt_start(scored: dict) -> int:
    """Where the text's tokens start (1, just after BOS, for a result written before the field)."""
    return int(scored.get("prompt_start", 1))


def peak(scored: dict) -> tuple[int, float] | None:
    """(position, activation) of the strongest finite activation on the text's tokens; None if none."""
    acts = scored["activations"]
    positions = [i for i in range(prompt_start(scored), len(acts)) if math.isfinite(acts[i])]
    if not positions:
        return None
    best = max(positions, key=acts.__getitem__)
    return best, float(acts[best])


def mean_xent(scored: dict) -> tuple[float, int]:
    """(mean cross-entropy in nats, number of tokens) over the text's tokens; NaN when none has one."""
    xents = [x for x in scored["xent"][prompt_start(scored):] if x is not None]
    return (sum(xents) / len(xents) if xents else float("nan")), len(xents)

"""What counts in the summary of a scored text (`epo-tui score`, the `scored` event, the scratchpad).

Only the text's own tokens count, from `prompt_start` on: BOS, the prefix and their special tokens
are laid out before it, and no search can change them, so a latent that fires on `<|endoftext|>`
must not make the text look active. The CLI and the UI both summarise through here, so they agree.

Plain Python, shared by the CLI and the UI.
"""

from __future__ import annotations

import math

from epo_tui.protocol import Scored


def peak(scored: Scored) -> tuple[int, float] | None:
    """(position, activation) of the strongest finite activation on the text's tokens; None if none."""
    acts = scored.activations
    positions = [i for i in range(scored.prompt_start, len(acts)) if math.isfinite(acts[i])]
    if not positions:
        return None
    best = max(positions, key=acts.__getitem__)
    return best, float(acts[best])


def mean_xent(scored: Scored) -> tuple[float, int]:
    """(mean cross-entropy in nats, number of tokens) over the text's tokens; NaN when none has one."""
    xents = [x for x in scored.xent[scored.prompt_start:] if x is not None]
    return (sum(xents) / len(xents) if xents else float("nan")), len(xents)

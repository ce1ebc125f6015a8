"""The unit the fluency penalty prices a nat in (`search.penalty_scale`), so that λ means the same on
every SAE.

Elite k maximizes f_k = objective - λ_k · (scale / PENALTY_UNITS) · xent, which ranks prompts exactly as
PENALTY_UNITS · objective / scale - λ_k · xent does: λ = 1 trades a tenth of the scale for one nat of
cross-entropy, λ = 20 twice the scale. The scale is, by preference:
  1. the latent's dataset maximum (engine-independent store `dataset_stats`, written by
     `epo-tui import` or `epo-tui dataset`; the demo pack ships its own), for a single SAE latent;
  2. else MEASURED_SIGMAS standard deviations of the target's optimized value (an SAE latent's
     pre-activation) over every position of a few prompts the model samples itself: a latent's
     typical swing on ordinary text grows with its SAE's scale exactly as its maximum does, and needs
     no dataset;
`search.penalty_scale = "measured"` always measures (ignoring the dataset statistics); "none" uses 1,
the target's raw units (λ as before scaling existed). Nothing is rounded: an SAE whose activations are
50 times another's gets a scale 50 times as large, so the two searches choose the same prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PENALTY_UNITS = 10.0  # λ = 1 prices one nat at scale / PENALTY_UNITS
# On the demo SAE, 3 standard deviations of a latent's pre-activation over 160 positions of the model's
# own samples is the median latent's held-out maximum (ratio 2.9 at seed 0, 3.1 at seed 1; half the
# latents within a factor 1.25 either way): measured by scripts in the closing note.
MEASURED_SIGMAS = 3.0
DATASET_MAXIMUM, MEASURED, NONE = "dataset maximum", "measured", "none"  # ObjectiveScale.source


@dataclass(frozen=True)
class ObjectiveScale:
    """`value` in the target's own units (an SAE latent's activation units); `source` says where it came
    from: DATASET_MAXIMUM, MEASURED or NONE. For several SAE latents, `features` holds each one's scale
    (the search divides each latent by its own before combining them) and `value` is 1."""

    value: float
    source: str
    features: tuple[float, ...] = ()

    def describe(self) -> str:
        """One line for a log or a report, e.g. "λ = 1 prices a nat at 0.75 (a tenth of the dataset maximum, 7.5)"."""
        if self.source == NONE:
            return "λ prices a nat in the feature's raw units (search.penalty_scale = 'none')"
        what = {DATASET_MAXIMUM: "the dataset maximum",
                MEASURED: f"{MEASURED_SIGMAS:g} standard deviations of the feature over the model's own text"}
        if self.features:
            each = ", ".join(f"{v:.3g}" for v in self.features)
            return (f"λ = 1 prices a nat at a tenth of each feature's {what[self.source].removeprefix('the ')} "
                    f"({each}), each feature divided by its own")
        return (f"λ = 1 prices a nat at {self.value / PENALTY_UNITS:.3g} (a tenth of {what[self.source]}, "
                f"{self.value:.3g})")

    def to_json(self) -> dict:
        """result.json's `penalty_scale`: `source`, `value` (in the target's units), `features` (each latent's
        own scale; empty for one latent), `nat_at_lambda_1` (what one nat of xent costs at λ = 1, in the
        objective's units: for several latents, each latent's own scale is 1) and `description`."""
        return {"source": self.source, "value": self.value, "features": list(self.features),
                "nat_at_lambda_1": self.per_nat(), "description": self.describe()}

    def per_nat(self) -> float:
        """What one nat of xent costs at λ = 1, in the objective's units."""
        return self.value / PENALTY_UNITS if self.source != NONE else 1.0

    def xent_weights(self, lambdas_K: np.ndarray) -> np.ndarray:
        """λ_k · scale / PENALTY_UNITS (objective units per nat), float32, for the fitness f_k."""
        return (np.asarray(lambdas_K, np.float64) * self.per_nat()).astype(np.float32)


def from_dataset(maximum: float | None) -> ObjectiveScale | None:
    """The dataset maximum as the scale, or None where it is unknown, not finite or not positive (a latent
    that never fired on the dataset)."""
    if maximum is None or not math.isfinite(maximum) or maximum <= 0:
        return None
    return ObjectiveScale(float(maximum), DATASET_MAXIMUM)


def per_feature(scales: list[ObjectiveScale | None]) -> ObjectiveScale | None:
    """Several features' own scales as one: None unless every feature has one of the same source."""
    if not scales or any(s is None for s in scales) or len({s.source for s in scales}) != 1:
        return None
    if scales[0].source == NONE:
        return None
    return ObjectiveScale(1.0, scales[0].source, tuple(s.value for s in scales))


def measured(values: np.ndarray) -> ObjectiveScale:
    """MEASURED_SIGMAS standard deviations of `values` (the target's optimized value at every position of
    the model's own samples, any shape). A target that does not vary there (or a non-finite one) gets 1,
    the raw units, with source NONE."""
    values = np.asarray(values, np.float64).ravel()
    sigma = float(values.std()) if values.size and np.isfinite(values).all() else 0.0
    if not sigma > 0:
        return ObjectiveScale(1.0, NONE)
    return ObjectiveScale(MEASURED_SIGMAS * sigma, MEASURED)

"""`epo-tui bench --quality --pairs`: can the search make two latents fire on one token, fluently?

The seed could not get two features to fire together at a reasonable fluency penalty. Here, for N random
pairs of latents that fire together on some token of the held-out text (both at >= COFIRING_SHARE of their
held-out maxima there; drawn uniformly from all such pairs, seeded), one search per pair maximizes the
seed's L_p combination of the two (`feature.combine = "lp"`, each latent divided by its own scale,
`read = "max"`: on whichever token the two meet, λ over PAIR_PENALTY_RANGE instead of the config's range).
A pair succeeds when some prompt the search kept (frontier or elites), at an xent no worse than the
held-out limit of `bench --quality`, has a token on which both latents reach HALF_MAXIMUM of their held-out
maxima. Each pair also reports the held-out text's own best token by the same measure (`dataset_joint`,
what the search has to beat), and the best share at any xent (`unlimited_joint`), which tells a pair that
fired together only at poor fluency from one that never did.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui.bench import quality
from epo_tui.bench.report import Progress, console, plain, quiet
from epo_tui.budget import Deadline
from epo_tui.config import Config
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.runner import PlainSearch, StopFlag, run_search
from epo_tui.engine.sae import activations, feature_pre_and_act
from epo_tui.engine.search import Search
from epo_tui.errors import UserError

HALF_MAXIMUM = 0.5  # each latent's share of its held-out maximum, on one token, for a pair to count
GOAL_FRACTION = 0.6
PAIR_LP_OFFSET = 1.0  # relu(a / scale + offset): in units of each latent's scale, a gradient down to -1 scale
# λ for the pairs' searches, log-spaced as search.penalty_min/max are. With the default 1..20 every elite
# ended far under the xent limit (2.2-4.8 against 5.75; mean best share 10%, demo, seed 0, 30 s per
# pair); 0.1..5 gave 21%, 0.02..2 gave 25% (2026-12-02, README "Search quality").
PAIR_PENALTY_RANGE = (0.02, 2.0)
# Two latents fire together where both reach this share of their held-out maxima on one token. Above zero
# alone counts pairs that meet only at a ReLU SAE's noise floor: on the demo, of the 614,952 pairs above zero
# together somewhere, the median never passes 8% of both maxima; for five such pairs the best of five searches
# each stayed at 24-42%, even at any xent; of pairs at 25-50% there, 9 in 10 reached half (README "Search quality").
COFIRING_SHARE = 0.25


def cofiring_pairs(pair: ModelWithSAE, tokens_RxL: np.ndarray, mask_RxL: np.ndarray,
                   floor_S: np.ndarray | None = None) -> np.ndarray:
    """Every pair (a < b) of latents that are both above 0 and at least `floor_S` (activation units, one per
    latent; None: 0) on one counted token, as Px2 int64, sorted. Memory grows with the number of distinct
    pairs, not with d_sae squared."""
    S = pair.sae.d_sae
    floor = jnp.zeros(S, jnp.float32) if floor_S is None else jnp.asarray(floor_S, jnp.float32)
    codes = []
    for _, sae_in_BxLxD, m in quality.heldout_batches(pair, tokens_RxL, mask_RxL):
        fires_BLxS = np.asarray(_fires(pair.sae, sae_in_BxLxD, floor)).reshape(-1, S) & m.reshape(-1, 1)
        for position in np.flatnonzero(fires_BLxS.sum(-1) >= 2):
            on = np.flatnonzero(fires_BLxS[position])
            a, b = np.triu_indices(len(on), k=1)
            codes.append(on[a].astype(np.int64) * S + on[b])
        if len(codes) > 64:
            codes = [np.unique(np.concatenate(codes))]
    if not codes:
        return np.zeros((0, 2), np.int64)
    unique = np.unique(np.concatenate(codes))
    return np.stack([unique // S, unique % S], axis=1)


@jax.jit
def _fires(sae, sae_in_BxLxD: jax.Array, floor_S: jax.Array) -> jax.Array:
    act_BxLxS = activations(sae, sae_in_BxLxD)
    return (act_BxLxS > 0) & (act_BxLxS >= floor_S)


def heldout_joint(pair: ModelWithSAE, tokens_RxL: np.ndarray, mask_RxL: np.ndarray, chosen: list[tuple[int, int]],
                  maxima_S: np.ndarray) -> np.ndarray:
    """For each pair, the held-out text's own best: the max over counted tokens of the smaller of the two
    latents' activations, each as a share of its held-out maximum (what the search is measured against)."""
    latents = sorted({i for p in chosen for i in p})
    column = {latent: j for j, latent in enumerate(latents)}
    a = np.array([column[p[0]] for p in chosen])
    b = np.array([column[p[1]] for p in chosen])
    best = np.zeros(len(chosen))
    scale = maxima_S[latents].astype(np.float64)
    for _, sae_in_BxLxD, m in quality.heldout_batches(pair, tokens_RxL, mask_RxL):
        _, act_BxLxF = feature_pre_and_act(pair.sae, sae_in_BxLxD, jnp.asarray(latents, jnp.int32))
        share_PxF = np.asarray(act_BxLxF, np.float64)[m] / scale
        if len(share_PxF):
            best = np.maximum(best, np.minimum(share_PxF[:, a], share_PxF[:, b]).max(0))
    return best


def joint_activation(pair: ModelWithSAE, search: Search, tokens_BxN: np.ndarray, latents: tuple[int, int],
                     maxima: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(joint_B, position_B): for each prompt, the best over its optimized tokens of the smaller of the two
    latents' activations, each as a share of its maximum; and the position (0 = first optimized token)."""
    prefix = np.asarray(search.prefix_ids, np.int32)
    chunk = search.st.elites * search.st.candidates
    joint, where = [], []
    for start in range(0, len(tokens_BxN), chunk):
        rows = tokens_BxN[start:start + chunk]
        full = np.concatenate([np.repeat(prefix[None], chunk, 0), quality.padded(rows, chunk)], axis=1)
        _, sae_in = pair.forward(jnp.asarray(full), logits=False)
        _, act_BxLxF = feature_pre_and_act(pair.sae, sae_in, jnp.asarray(latents, jnp.int32))
        share_BxN = (np.asarray(act_BxLxF)[:, len(prefix):] / np.asarray(maxima, np.float32)).min(-1)[:len(rows)]
        joint.append(share_BxN.max(-1))
        where.append(share_BxN.argmax(-1))
    return np.concatenate(joint), np.concatenate(where)


def run_pairs(pair: ModelWithSAE, config: Config, heldout: list[str], pairs: int, iterations: int | None,
              seed: int = 0, labels: dict[int, str] | None = None, progress: Progress = quiet,
              stop: StopFlag | None = None, time_budget_s: float | None = None,
              cofiring_share: float = COFIRING_SHARE) -> dict:
    """The pairs benchmark as one JSON-able dict (see the module docstring); each pair's search runs as
    `quality.run_quality`'s do. The draw takes pairs both at >= `cofiring_share` of their held-out maxima
    on one token (0: both above zero)."""
    if config.feature.kind != "sae":
        raise UserError("bench --quality --pairs: needs feature.kind = 'sae' (it measures SAE latents)")
    if iterations is None and time_budget_s is None:
        raise ValueError("run_pairs: give iterations, time_budget_s or both")
    started = time.perf_counter()
    stop = stop or StopFlag()
    tokens, mask = quality.heldout_rows(pair, heldout)
    if not mask.any():
        raise UserError("bench --quality: the held-out sample holds no text")
    together = _together(cofiring_share)
    progress(f"held-out sample: {len(heldout)} documents, {int(mask.sum()):,} tokens; finding latents that "
             f"fire together ({together})")
    maxima_S, _ = quality.dataset_maxima(pair, tokens, mask)
    candidates = cofiring_pairs(pair, tokens, mask, cofiring_share * maxima_S)
    if len(candidates) < pairs:
        raise UserError(f"bench --quality --pairs: {pairs} pairs asked, {len(candidates)} fire together "
                        f"({together}) on the held-out sample")
    picked = np.random.default_rng(seed).choice(len(candidates), size=pairs, replace=False)
    chosen = [tuple(int(i) for i in candidates[p]) for p in sorted(picked)]
    cap = iterations if iterations is not None else sys.maxsize
    feature = dataclasses.replace(config.feature, combine="lp", read="max", lp_offset=PAIR_LP_OFFSET)
    search_config = dataclasses.replace(config, feature=feature, search=dataclasses.replace(
        config.search, iterations=iterations or config.search.iterations, time_budget="",
        penalty_min=PAIR_PENALTY_RANGE[0], penalty_max=PAIR_PENALTY_RANGE[1]))

    def search_for(latents: tuple[int, int]) -> Search:
        return Search(pair, dataclasses.replace(search_config, feature=dataclasses.replace(
            feature, index=latents[0], indices=latents)), mesh=pair.mesh)

    dataset_joint = heldout_joint(pair, tokens, mask, chosen, maxima_S)
    first = search_for(chosen[0])
    median, limit, windows = quality.xent_limit(first, tokens, mask, progress)
    quality.compile_steps(first, progress)
    rows = []
    for n, latents in enumerate(chosen, 1):
        if stop.requested:
            break
        label = f"[{n}/{pairs}] latents {latents[0]} + {latents[1]}"
        maxima = (float(maxima_S[latents[0]]), float(maxima_S[latents[1]]))
        progress(f"{label}: held-out maxima {maxima[0]:.3f} and {maxima[1]:.3f}, both at "
                 f"{dataset_joint[n - 1]:.0%} on the held-out text's best token; searching "
                 f"{quality.per_latent(iterations, time_budget_s)}")
        deadline = Deadline(time_budget_s)
        search = search_for(latents)
        stepper = PlainSearch(search, cap)
        timings = run_search(stepper, quality.IterationLines(progress, label), stop, deadline)
        state = stepper.state
        xent = np.concatenate([state.frontier.xent, state.xent_K])
        prompts = np.concatenate([state.frontier.tokens, state.tokens_KxN])
        fluent = np.flatnonzero(xent <= limit)
        row = {"latents": list(latents), "labels": [(labels or {}).get(i) for i in latents],
               "dataset_max": list(maxima), "dataset_joint": float(dataset_joint[n - 1]),
               "iterations_run": timings.iterations_run,
               "distinct_elites": quality.distinct_prompts(state.tokens_KxN),
               "joint": None, "prompt": None, "xent": None, "token": None}
        # every prompt's share once: the best at any xent tells a failing pair that lacks fluency from one
        # that never fired together; the best under the limit decides the pair
        joint, where = joint_activation(pair, search, prompts, latents, maxima)
        anywhere = int(np.argmax(joint))
        row.update(unlimited_joint=float(joint[anywhere]), unlimited_xent=float(xent[anywhere]))
        if len(fluent):
            best = int(fluent[np.argmax(joint[fluent])])
            ids = prompts[best]
            row.update(joint=float(joint[best]), prompt=pair.model.decode(ids), xent=float(xent[best]),
                       token="".join(pair.model.token_strings(ids[where[best]:where[best] + 1])))
        row["success"] = row["joint"] is not None and row["joint"] >= HALF_MAXIMUM
        rows.append(row)
        shown = "no prompt under the limit" if row["joint"] is None else (
            f"both at >= {row['joint']:.0%} of their maxima on {row['token']!r} (xent {row['xent']:.2f})")
        progress(f"{label}: {shown}; {'succeeds' if row['success'] else 'fails'} (at any xent: "
                 f"{row['unlimited_joint']:.0%}, xent {row['unlimited_xent']:.2f})")
    succeeded = sum(r["success"] for r in rows)
    return {
        "model": pair.model.name, "sae": pair.sae.display_name, "hook": pair.sae.hook_name,
        "heldout": {"documents": len(heldout), "tokens": int(mask.sum()), "windows": windows,
                    "median_window_xent": median, "cofiring_pairs": int(len(candidates)),
                    "cofiring_share": cofiring_share},
        "search": {"per_pair": quality.per_latent(iterations, time_budget_s), "iterations": iterations,
                   "time_budget_s": time_budget_s, "elites": config.search.elites,
                   "candidates": config.search.candidates, "seed": config.search.seed,
                   "combine": "lp", "lp_p": feature.lp_p, "lp_offset": feature.lp_offset, "read": "max",
                   "penalty_scale": config.search.penalty_scale,
                   "penalty_min": PAIR_PENALTY_RANGE[0], "penalty_max": PAIR_PENALTY_RANGE[1]},
        "pair_seed": seed, "xent_limit": limit, "half_maximum": HALF_MAXIMUM,
        "pairs": rows, "succeeded": succeeded, "fraction": succeeded / len(rows) if rows else 0.0,
        "goal_fraction": GOAL_FRACTION, "interrupted": len(rows) < pairs,
        "seconds": {"total": time.perf_counter() - started},
    }


def print_pairs(report: dict) -> None:
    from rich.table import Table

    out = console()
    s = report["search"]
    held = report["heldout"]
    out.print(f"{plain(report['model'])} + {plain(report['sae'])} at {report['hook']}; "
              f"{held['cofiring_pairs']:,} pairs fire together on the held-out text "
              f"({_together(held['cofiring_share'])}); "
              f"{s['per_pair']} of {s['elites']} x {s['candidates']} per pair, L_{s['lp_p']:g} with offset "
              f"{s['lp_offset']:g}, read at the max, λ {s['penalty_min']:g}..{s['penalty_max']:g}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (("latents", "left"), ("maxima", "right"), ("held-out text", "right"),
                            ("both reach", "right"), ("on", "left"), ("xent", "right"), ("ok", "left"),
                            ("at any xent", "right")):
        table.add_column(column, justify=justify)
    for row in report["pairs"]:
        none = row["joint"] is None
        table.add_row(_latents(row), f"{row['dataset_max'][0]:.2f}, {row['dataset_max'][1]:.2f}",
                      f"{row['dataset_joint']:.0%}", "-" if none else f"{row['joint']:.0%}",
                      "" if none else plain(repr(row["token"])), "-" if none else f"{row['xent']:.2f}",
                      "yes" if row["success"] else "no",
                      f"{row['unlimited_joint']:.0%} at {row['unlimited_xent']:.2f}")
    out.print(table)
    out.print("each pair's best prompt under the xent limit:")
    for row in report["pairs"]:  # whole, on lines of their own: a table column would fold them
        out.print(f"  {_latents(row)}: " + ("none" if row["prompt"] is None else plain(repr(row["prompt"]))))
    verdict = "meets" if report["fraction"] >= report["goal_fraction"] else "misses"
    out.print(f"both latents at >= {report['half_maximum']:.0%} of their held-out maxima on one token at xent <= "
              f"{report['xent_limit']:.2f}: {report['succeeded']}/{len(report['pairs'])} = {report['fraction']:.0%} "
              f"({verdict} the goal of {report['goal_fraction']:.0%}); {report['seconds']['total']:.0f} s")


def _together(share: float) -> str:
    """What "fire together" means in this run, for its messages."""
    if share <= 0:
        return "both above zero on one token"
    return f"both at >= {share:.0%} of their held-out maxima on one token"


def _latents(row: dict) -> str:
    return f"{row['latents'][0]} + {row['latents'][1]}"

"""`epo-tui bench --quality`: does the search find prompts that beat the dataset, fluently?

The seed's headline: EPO finds prompts that activate a feature more than any dataset example. Here,
for N random alive latents (seeded): the latent's maximum activation over every position of a
held-out text, against the best activation the search reaches at a cross-entropy no worse than the
held-out text's own (median over windows as long as the prompt, each scored exactly as the search
scores a prompt) plus a margin of one nat. Each search also reports how many of its elites are distinct
prompts at the end (`MIN_DISTINCT_ELITES` of 8 is the goal) and its frontier's hypervolume
(`frontier_hypervolume`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui.bench.report import Progress, console, plain, quiet
from epo_tui.budget import Deadline, format_budget
from epo_tui.config import Config
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.runner import PlainSearch, Reporter, StopFlag, run_search
from epo_tui.engine.sae import activations
from epo_tui.engine.search import Search
from epo_tui.engine.text_rows import countable, pack_rows, token_stream
from epo_tui.errors import UserError
from epo_tui.progress import best_found

XENT_MARGIN = 1.0  # nats over the held-out median window xent a winning prompt may have
GOAL_FRACTION = 0.95
MIN_DISTINCT_ELITES = 0.75  # of the elites: at least 6 of 8 distinct prompts at the end of every search
ROW_TOKENS = 128  # held-out rows: BOS + 127 tokens of the document stream
ROWS_PER_BATCH = 32



def read_heldout(path: Path) -> list[str]:
    """Documents of a held-out sample: `.jsonl` (one {"text": ...} per line) or plain text (one document)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--heldout: cannot read {path}: {err}") from None
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
    return texts


def heldout_rows(pair: ModelWithSAE, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens RxL, mask RxL): the documents joined by EOS in rows of BOS + L-1 tokens (`text_rows`);
    the mask is False at BOS, padding and every special token (the EOS between documents too)."""
    tokenizer = pair.model.tokenizer
    bos = pair.model.encode("")[0]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    stream = token_stream(tokenizer, texts, eos)
    tokens, mask = pack_rows(stream, min(ROW_TOKENS, pair.model.cfg.max_positions), bos)
    return tokens, countable(tokens, mask, pair.model.special_token_ids())


def heldout_batches(pair: ModelWithSAE, tokens_RxL: np.ndarray, mask_RxL: np.ndarray
                    ) -> Iterator[tuple[int, jax.Array, np.ndarray]]:
    """(first row, the SAE's input BxLxD, mask BxL) of each batch of ROWS_PER_BATCH held-out rows; the last
    batch is padded with rows the mask leaves out (one shape, one compilation)."""
    for start in range(0, len(tokens_RxL), ROWS_PER_BATCH):
        t, m = padded(tokens_RxL[start:start + ROWS_PER_BATCH], ROWS_PER_BATCH), \
            padded(mask_RxL[start:start + ROWS_PER_BATCH], ROWS_PER_BATCH)
        _, sae_in_BxLxD = pair.forward(jnp.asarray(t), logits=False)
        yield start, sae_in_BxLxD, m


def dataset_maxima(pair: ModelWithSAE, tokens_RxL: np.ndarray, mask_RxL: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(max activation S, flat position of that max S) of every latent over the unmasked positions."""

    best_S = np.full(pair.sae.d_sae, -np.inf, np.float32)
    where_S = np.zeros(pair.sae.d_sae, np.int64)
    for start, sae_in_BxLxD, m in heldout_batches(pair, tokens_RxL, mask_RxL):
        value_S, arg_S = (np.asarray(a) for a in _masked_max(pair.sae, sae_in_BxLxD, jnp.asarray(m)))
        better = value_S > best_S
        best_S[better] = value_S[better]
        where_S[better] = arg_S[better] + start * tokens_RxL.shape[1]
    return best_S, where_S


@jax.jit
def _masked_max(sae, sae_in_BxLxD: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    acts_BLxS = activations(sae, sae_in_BxLxD).reshape(-1, sae.W_enc_DxS.shape[1])
    acts_BLxS = jnp.where(mask_BxL.reshape(-1, 1), acts_BLxS, -jnp.inf)
    return acts_BLxS.max(0), acts_BLxS.argmax(0)


def padded(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with zero rows appended up to `rows` (one shape, one compilation)."""
    missing = rows - len(array)
    return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)]) if missing else array


def heldout_windows(tokens_RxL: np.ndarray, mask_RxL: np.ndarray, width: int) -> np.ndarray:
    """Non-overlapping `width`-token windows of each row's text (never across rows, never holding a
    position the mask leaves out, such as a document boundary), as WxN."""
    windows = []
    for row, bad in zip(tokens_RxL, ~mask_RxL, strict=True):
        for start in range(1, len(row) - width + 1, width):
            if not bad[start:start + width].any():
                windows.append(row[start:start + width])
    return np.asarray(windows, np.int32).reshape(-1, width)


def window_xents(search: Search, windows_WxN: np.ndarray) -> np.ndarray:
    """Each window's xent, as the search computes a prompt's (after BOS and the prefix), in batches
    of the search's own children count so nothing recompiles."""
    batch = search.st.elites * search.st.candidates
    out = []
    for start in range(0, len(windows_WxN), batch):
        chunk = windows_WxN[start:start + batch]
        _, _, xent = search.evaluate(padded(chunk, batch))
        out.append(xent[:len(chunk)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def xent_limit(search: Search, tokens_RxL: np.ndarray, mask_RxL: np.ndarray, progress: Progress = quiet
               ) -> tuple[float, float, int]:
    """(median window xent, the limit a prompt must keep: that + XENT_MARGIN, number of windows) of the
    held-out rows, in windows as long as `search`'s prompts. UserError when there is no such window."""
    width = search.st.prompt_tokens
    windows = heldout_windows(tokens_RxL, mask_RxL, width)
    if not len(windows):
        raise UserError(f"bench --quality: the held-out sample has no {width}-token window")
    median = float(np.median(window_xents(search, windows)))
    limit = median + XENT_MARGIN
    progress(f"held-out median xent over {len(windows):,} windows of {width} tokens: {median:.3f}; a prompt "
             f"counts at xent <= {limit:.3f}")
    return median, limit, int(len(windows))


def compile_steps(search: Search, progress: Progress = quiet) -> None:
    """Compiles `search`'s steps before any budget starts, so that each search's budget goes to
    searching (else the compiler takes most of the first one's). Every search of the run shares them."""
    progress("compiling the search's steps (outside every search's budget)")
    search.warm_up()


def context_snippet(pair: ModelWithSAE, tokens_RxL: np.ndarray, flat: int, before: int = 12, after: int = 3) -> str:
    """The held-out text around a flat position, the token there in [brackets]; each token shown as
    everywhere else (`LanguageModel.token_strings`: a piece of a character as `\\xNN`)."""
    row, pos = divmod(int(flat), tokens_RxL.shape[1])
    ids = tokens_RxL[row]

    def shown(span) -> str:
        return "".join(pair.model.token_strings(span))

    return (shown(ids[max(1, pos - before):pos]) + "[" + shown(ids[pos:pos + 1]) + "]"
            + shown(ids[pos + 1:pos + 1 + after]))


def best_prompts(search: Search, state, xent_limit: float) -> dict:
    """The best activation of everything kept (frontier and elites), unconstrained and at xent <= limit."""
    frontier = state.frontier
    xent = np.concatenate([frontier.xent, state.xent_K])
    act = np.concatenate([frontier.act, state.act_K])
    tokens = np.concatenate([frontier.tokens, state.tokens_KxN])
    decode = search.pair.model.decode
    top = int(np.argmax(act))
    out = {"best_act": float(act[top]), "best_xent": float(xent[top]), "best_prompt": decode(tokens[top])}
    fluent = np.flatnonzero(xent <= xent_limit)
    if len(fluent):
        pick = int(fluent[np.argmax(act[fluent])])
        out.update(fluent_act=float(act[pick]), fluent_xent=float(xent[pick]), fluent_prompt=decode(tokens[pick]))
    else:
        out.update(fluent_act=None, fluent_xent=None, fluent_prompt=None)
    return out


def distinct_prompts(tokens_KxN: np.ndarray) -> int:
    """How many different prompts the K elites hold."""
    return len({row.tobytes() for row in np.asarray(tokens_KxN)})


def frontier_hypervolume(xent: np.ndarray, act: np.ndarray, xent_limit: float, dataset_max: float) -> float:
    """The area, in nats × dataset maxima, that the prompts dominate up to `xent_limit`: the integral
    over x from -inf to `xent_limit` of max(0, the best act / dataset_max of any prompt at xent <= x).

    It grows when the frontier reaches further left (more fluent) or higher (more active), and counts
    nothing past the limit a prompt must keep to beat the dataset. 0 for no prompt under the limit.
    ValueError for a dataset_max that is not positive.
    """
    if not dataset_max > 0:
        raise ValueError(f"frontier_hypervolume: dataset_max must be > 0, got {dataset_max}")
    xent, act = np.asarray(xent, np.float64), np.asarray(act, np.float64) / dataset_max
    inside = xent <= xent_limit
    xent, act = xent[inside], act[inside]
    order = np.argsort(xent, kind="stable")
    best, area = 0.0, 0.0
    edges = np.append(xent[order], xent_limit)
    for i, j in enumerate(order):
        best = max(best, act[j])
        area += best * (edges[i + 1] - edges[i])
    return float(area)


class IterationLines(Reporter):
    def __init__(self, progress: Progress, label: str, every: int = 10):
        self.progress, self.label, self.every = progress, label, every

    def iteration_done(self, state, seconds: float) -> None:
        if state.iteration % self.every == 0:
            self.progress(f"{self.label}: iteration {state.iteration}, best act {best_found(state)[0]:.3f}")


def per_latent(iterations: int | None, time_budget_s: float | None) -> str:
    """How long each latent's search runs, in words: "50 iterations", "2m", or "2m or 50 iterations,
    whichever comes first"."""
    count = f"{iterations} iteration{'' if iterations == 1 else 's'}"
    if time_budget_s is None:
        return count
    if iterations is None:
        return format_budget(time_budget_s)
    return f"{format_budget(time_budget_s)} or {count}, whichever comes first"


def run_quality(pair: ModelWithSAE, config: Config, heldout: list[str], latents: int, iterations: int | None,
                seed: int = 0, labels: dict[int, str] | None = None,
                progress: Progress = quiet, stop: StopFlag | None = None,
                time_budget_s: float | None = None) -> dict:
    """The quality benchmark as one JSON-able dict (see the module docstring). Each latent's search runs
    `iterations`, or for `time_budget_s` of wall clock (its set-up included), or whichever comes first
    when both are given."""
    if config.feature.kind != "sae":
        raise UserError("bench --quality: needs feature.kind = 'sae' (it measures SAE latents)")
    if iterations is None and time_budget_s is None:
        raise ValueError("run_quality: give iterations, time_budget_s or both")
    started = time.perf_counter()
    stop = stop or StopFlag()
    tokens, mask = heldout_rows(pair, heldout)
    if not mask.any():
        raise UserError("bench --quality: the held-out sample holds no text")
    progress(f"held-out sample: {len(heldout)} documents, {int(mask.sum()):,} tokens; computing every "
             f"latent's maximum")
    maxima_S, where_S = dataset_maxima(pair, tokens, mask)
    alive = np.flatnonzero(maxima_S > 0)
    if len(alive) < latents:
        raise UserError(f"bench --quality: {latents} latents asked, {len(alive)} fire on the held-out sample")
    chosen = sorted(int(i) for i in np.random.default_rng(seed).choice(alive, size=latents, replace=False))
    cap = iterations if iterations is not None else sys.maxsize  # no cap: the budget alone stops each search
    search_config = dataclasses.replace(config, search=dataclasses.replace(
        config.search, iterations=iterations or config.search.iterations, time_budget=""))
    mesh = pair.mesh

    def search_for(latent: int) -> Search:
        feature = dataclasses.replace(config.feature, index=latent, indices=())
        return Search(pair, dataclasses.replace(search_config, feature=feature), mesh=mesh)

    first = search_for(chosen[0])
    median, limit, windows = xent_limit(first, tokens, mask, progress)
    compile_steps(first, progress)
    rows, search_seconds = [], []
    for n, latent in enumerate(chosen, 1):
        if stop.requested:
            break
        label = f"[{n}/{latents}] latent {latent}"
        progress(f"{label}: dataset max {maxima_S[latent]:.3f}; searching {per_latent(iterations, time_budget_s)}")
        deadline = Deadline(time_budget_s)  # the search's set-up counts, as in `run`
        search = search_for(latent)
        t0 = time.perf_counter()
        stepper = PlainSearch(search, cap)
        timings = run_search(stepper, IterationLines(progress, label), stop, deadline)
        state = stepper.state
        search_seconds.append(time.perf_counter() - t0)
        best = best_prompts(search, state, limit)
        beat = best["fluent_act"] is not None and best["fluent_act"] > float(maxima_S[latent])
        frontier = state.frontier
        spread = {"distinct_elites": distinct_prompts(state.tokens_KxN),
                  "hypervolume": frontier_hypervolume(np.concatenate([frontier.xent, state.xent_K]),
                                                      np.concatenate([frontier.act, state.act_K]), limit,
                                                      float(maxima_S[latent])),
                  "frontier_xent": [float(frontier.xent.min()), float(frontier.xent.max())],
                  "frontier_act": [float(frontier.act.min()), float(frontier.act.max())],
                  "penalty_scale": search.objective_scale.describe()}
        rows.append({"latent": latent, "label": (labels or {}).get(latent),
                     "dataset_max": float(maxima_S[latent]),
                     "dataset_context": context_snippet(pair, tokens, where_S[latent]),
                     **best, "iterations_run": timings.iterations_run, "budget_ran_out": timings.budget_ran_out,
                     **spread, "beat": bool(beat)})
        fluent = "none" if best["fluent_act"] is None else f"{best['fluent_act']:.3f}"
        progress(f"{label}: best act {best['best_act']:.3f} (xent {best['best_xent']:.3f}); at xent <= "
                 f"{limit:.2f}: {fluent}; {'beats' if beat else 'does not beat'} the dataset; "
                 f"{spread['distinct_elites']}/{len(state.tokens_KxN)} distinct elites, hypervolume "
                 f"{spread['hypervolume']:.2f}")
    beaten = sum(r["beat"] for r in rows)
    elites = config.search.elites
    enough = math.ceil(MIN_DISTINCT_ELITES * elites)
    return {
        "model": pair.model.name, "sae": pair.sae.display_name, "hook": pair.sae.hook_name,
        "heldout": {"documents": len(heldout), "tokens": int(mask.sum()), "windows": windows,
                    "window_tokens": config.search.prompt_tokens, "median_window_xent": median,
                    "alive_latents": int(len(alive)), "latents": int(pair.sae.d_sae)},
        "search": {"per_latent": per_latent(iterations, time_budget_s), "iterations": iterations,
                   "time_budget_s": time_budget_s, "elites": config.search.elites,
                   "candidates": config.search.candidates, "prompt_tokens": config.search.prompt_tokens,
                   "penalty_min": config.search.penalty_min, "penalty_max": config.search.penalty_max,
                   "seed": config.search.seed, "penalty_scale": config.search.penalty_scale},
        "latent_seed": seed, "xent_margin": XENT_MARGIN, "xent_limit": limit,
        "latents": rows, "beaten": beaten, "fraction": beaten / len(rows) if rows else 0.0,
        "goal_fraction": GOAL_FRACTION, "interrupted": len(rows) < latents,
        "distinct_elites": {"goal": enough, "min": min((r["distinct_elites"] for r in rows), default=None),
                            "searches_meeting_goal": sum(r["distinct_elites"] >= enough for r in rows)},
        "hypervolume_mean": float(np.mean([r["hypervolume"] for r in rows])) if rows else None,
        "seconds": {"total": time.perf_counter() - started,
                    "per_search_mean": float(np.mean(search_seconds)) if search_seconds else None},
    }


def print_quality(report: dict) -> None:
    from rich.table import Table

    out = console()
    h, s = report["heldout"], report["search"]
    out.print(f"{plain(report['model'])} + {plain(report['sae'])} at {report['hook']}; held-out "
                  f"{h['tokens']:,} tokens, median xent {h['median_window_xent']:.3f} over {h['windows']:,} "
                  f"windows of {h['window_tokens']} tokens; {s['per_latent']} of {s['elites']} x "
                  f"{s['candidates']} per latent")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (("latent", "right"), ("label", "left"), ("dataset max", "right"),
                            ("best act", "right"), ("its xent", "right"),
                            (f"act at xent <= {report['xent_limit']:.2f}", "right"), ("beat", "left"),
                            ("distinct", "right"), ("hypervolume", "right")):
        table.add_column(column, justify=justify)
    for row in report["latents"]:
        fluent = "-" if row["fluent_act"] is None else f"{row['fluent_act']:.3f}"
        table.add_row(str(row["latent"]), plain(row["label"] or ""), f"{row['dataset_max']:.3f}",
                      f"{row['best_act']:.3f}", f"{row['best_xent']:.3f}", fluent, "yes" if row["beat"] else "no",
                      f"{row['distinct_elites']}/{report['search']['elites']}", f"{row['hypervolume']:.2f}")
    out.print(table)
    verdict = "meets" if report["fraction"] >= report["goal_fraction"] else "misses"
    out.print(f"beat the dataset max at xent <= median + {report['xent_margin']:g}: {report['beaten']}/"
                  f"{len(report['latents'])} = {report['fraction']:.0%} ({verdict} the goal of "
                  f"{report['goal_fraction']:.0%}); {report['seconds']['total']:.0f} s")
    distinct, rows = report["distinct_elites"], report["latents"]
    if rows:
        out.print(f"distinct elites at the end: {distinct['searches_meeting_goal']}/{len(rows)} searches hold at "
                  f"least {distinct['goal']} of {report['search']['elites']} (fewest: {distinct['min']}); mean "
                  f"frontier hypervolume {report['hypervolume_mean']:.2f} nats x dataset max up to xent "
                  f"{report['xent_limit']:.2f}")


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, ensure_ascii=False)

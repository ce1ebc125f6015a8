"""Scoring prompts for the search: objective, reported activation and xent of each (DESIGN.md §3).

Two routes to the same numbers (to float rounding):
- `score` runs every optimized position after the fixed prefix (the starting elites, any batch);
- `ChildScorer.children` scores an iteration's children. A child equals its parent up to its first
  changed position s, so it reuses what the parent's pass kept (`Parents`: keys and values, per-position
  feature values and xent terms) before a bucket start b <= s, and runs only positions b..N-1. Children
  equal to their parent, repeated in the batch, or held by the search's score cache (scored in an
  earlier iteration: engine/score_cache.py) do not run at all.

Which route scores a child depends only on the batch and on the search state's score cache (part of
every checkpoint), never on timing or on what happens to be compiled: routes differ by float rounding,
so anything else would let a resumed search drift from the one it continues.

Shapes: K elites (parents), B prompts, c prompts per call, N optimized tokens, V vocabulary,
F features, P prefix length (BOS + prefix).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epo_tui.engine import sharding
from epo_tui.engine.export_cache import ExportedJit, register_dataclass_output
from epo_tui.engine.language_model import apply_model
from epo_tui.engine.objective import Target, combine, per_position, read
from epo_tui.engine.score_cache import ScoreCache

EVAL_CHUNK = 64  # prompts per forward inside one device: bounds the BxNxV logits in memory
SUFFIX_BUCKETS = 10  # start positions a child's suffix may begin at: one compiled executable each
# searches (distinct Statics) whose evaluators a long-lived worker keeps compiled; older ones are
# dropped, so their machine code is unmapped
KEPT_SEARCHES = 16


@dataclass(frozen=True)
class Statics:
    """Everything the jitted steps specialize on (hashable): no array, no feature index."""

    model_type: str
    cfg: Any
    center_writes: bool
    target: Target
    hooks: tuple[str, ...]
    elites: int
    candidates: int  # C: children per elite (search.candidates)
    prompt_tokens: int
    topk: int
    unmasked_top: int
    extra_resample: float
    skip_gradient_mask: float
    swap: float
    temperature_max: float


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Prefix:
    """BOS + prefix, computed once per run."""

    kv: tuple  # per layer (k, v), 1xPx...
    next_logits_V: jax.Array  # the prediction for the first optimized token


@register_dataclass_output  # the gradient pass returns it: export_cache serializes it
@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Parents:
    """What a child reuses of its parent, kept by the gradient pass over the K elites."""

    kv: tuple  # per layer (k, v), KxNx..: the optimized positions' keys and values
    next_logits_KxNxV: jax.Array  # float32; row j predicts token j (row 0 from the prefix)
    lse_KxN: jax.Array  # logsumexp of each row of next_logits
    xent_terms_KxN: jax.Array  # -log p(token j | everything before it), nats
    optimized_KxNxF: jax.Array  # the target's optimized per-position values (pre-activations for an SAE)
    reported_KxNxF: jax.Array  # the reported ones (true activations)


# ----------------------------------------------------------------------------------------------
# The pieces both routes share


def _logit_positions(st: Statics, L: int) -> int | None:
    """Positions whose logits a pass needs: all but the last (no token follows it), unless the target
    reads logits itself."""
    return None if st.target.kind == "logit" else L - 1


def _forward(params, sae, arrays, tokens_or_onehot, past_kv, st: Statics, keep_kv: bool = False):
    """(logits_BxLxV for the needed positions, optimized_BxLxF, reported_BxLxF, kv) after `past_kv`."""
    L = tokens_or_onehot.shape[1]
    logits, acts, kv = apply_model(params, tokens_or_onehot, past_kv, model_type=st.model_type, cfg=st.cfg,
                                   hooks=st.hooks, logits=True, center_writes=st.center_writes, keep_kv=keep_kv,
                                   logit_positions=_logit_positions(st, L))
    optimized_BxLxF, reported_BxLxF = per_position(st.target, arrays, sae, acts.get(st.target.hook), logits)
    return logits[:, :L - 1], optimized_BxLxF, reported_BxLxF, kv


def _objective_and_act(st: Statics, optimized_BxNxF, reported_BxNxF):
    """(objective_B, act_B): the optimized value at the read position and the reported one there."""
    objective_B, position_B = read(st.target, combine(st.target, optimized_BxNxF))
    reported_BxN = combine(st.target, reported_BxNxF)
    return objective_B, jnp.take_along_axis(reported_BxN, position_B[:, None], axis=-1)[:, 0]


def _picked(logits_BxNxV, tokens_BxN):
    return jnp.take_along_axis(logits_BxNxV, tokens_BxN[..., None], axis=-1)[..., 0]


def score(params, sae, arrays, prefix: Prefix, tokens_or_onehot, st: Statics, keep: bool = False):
    """(objective_B, act_B, xent_B, parents) for ids BxN or one-hot BxNxV after the prefix.

    xent is the mean over the N optimized tokens of -log p(token | before), in nats. With one-hot
    input (the gradient pass) d xent / d one-hot includes -log p itself. `parents` (only with `keep`)
    is what children of these prompts reuse; else None.
    """
    B, N = tokens_or_onehot.shape[:2]
    logits_BxMxV, optimized_BxNxF, reported_BxNxF, kv = _forward(params, sae, arrays, tokens_or_onehot,
                                                                 prefix.kv, st, keep_kv=keep)
    objective_B, act_B = _objective_and_act(st, optimized_BxNxF, reported_BxNxF)
    first_Bx1xV = jnp.broadcast_to(prefix.next_logits_V, (B, 1, prefix.next_logits_V.shape[-1]))
    next_logits_BxNxV = jnp.concatenate([first_Bx1xV, logits_BxMxV], axis=1)
    lse_BxN = jax.nn.logsumexp(next_logits_BxNxV, axis=-1)
    if tokens_or_onehot.ndim == 3:  # d xent / d one-hot: -log p of every token at every position
        terms_BxN = -(tokens_or_onehot * jax.nn.log_softmax(next_logits_BxNxV, axis=-1)).sum(-1)
    else:  # one gather: no BxNxV one-hot in memory
        terms_BxN = lse_BxN - _picked(next_logits_BxNxV, tokens_or_onehot)
    parents = None
    if keep:
        parents = Parents(kv=kv, next_logits_KxNxV=next_logits_BxNxV, lse_KxN=lse_BxN, xent_terms_KxN=terms_BxN,
                          optimized_KxNxF=optimized_BxNxF, reported_KxNxF=reported_BxNxF)
    return objective_B, act_B, terms_BxN.mean(-1), parents


def score_suffix(params, sae, arrays, prefix: Prefix, parents: Parents, tokens_BxN, parent_B, st: Statics,
                 start: int):
    """(objective_B, act_B, xent_B) of prompts equal to their parent (`parent_B` indexes the K parents)
    before position `start` (1 <= start < N): only positions start..N-1 run, attending to the prefix and
    the parent's keys and values before `start`."""
    B, N = tokens_BxN.shape
    past = tuple((jnp.concatenate([jnp.broadcast_to(pk, (B,) + pk.shape[1:]).astype(k.dtype), k[parent_B, :start]], 1),
                  jnp.concatenate([jnp.broadcast_to(pv, (B,) + pv.shape[1:]).astype(v.dtype), v[parent_B, :start]], 1))
                 for (pk, pv), (k, v) in zip(prefix.kv, parents.kv))
    suffix_BxS = tokens_BxN[:, start:]
    logits_BxMxV, optimized_BxSxF, reported_BxSxF, _ = _forward(params, sae, arrays, suffix_BxS, past, st)
    optimized_BxNxF = jnp.concatenate([parents.optimized_KxNxF[parent_B, :start], optimized_BxSxF], axis=1)
    reported_BxNxF = jnp.concatenate([parents.reported_KxNxF[parent_B, :start], reported_BxSxF], axis=1)
    objective_B, act_B = _objective_and_act(st, optimized_BxNxF, reported_BxNxF)
    # tokens before `start` are the parent's: so are their terms. Token `start` is predicted by the
    # parent's row `start`; the tokens after it by this pass's logits.
    before_B = parents.xent_terms_KxN[parent_B, :start].sum(-1)
    row_BxV = parents.next_logits_KxNxV[parent_B, start]
    at_start_B = parents.lse_KxN[parent_B, start] - _picked(row_BxV[:, None], suffix_BxS[:, :1])[:, 0]
    after_B = (jax.nn.logsumexp(logits_BxMxV, axis=-1) - _picked(logits_BxMxV, suffix_BxS[:, 1:])).sum(-1)
    return objective_B, act_B, (before_B + at_start_B + after_B) / N


# ----------------------------------------------------------------------------------------------
# Compiled steps over a mesh: prompts split along "data" (the "model" axis splits each layer's
# weights; jit partitions those itself)


def _score_local(params, sae, arrays, prefix, tokens_BxN, st: Statics):
    """(objective_B, act_B, xent_B) for this device's prompts, EVAL_CHUNK at a time."""
    B, N = tokens_BxN.shape
    chunk = min(EVAL_CHUNK, B)
    pad = (-B) % chunk
    padded = jnp.concatenate([tokens_BxN, jnp.broadcast_to(tokens_BxN[:1], (pad, N))]) if pad else tokens_BxN
    outs = jax.lax.map(lambda tokens_cxN: score(params, sae, arrays, prefix, tokens_cxN, st)[:3],
                       padded.reshape(-1, chunk, N))
    return tuple(o.reshape(-1)[:B] for o in outs)


@functools.lru_cache(maxsize=KEPT_SEARCHES)
def full_evaluator(st: Statics, mesh: Mesh):
    """jit(params, sae, arrays, prefix, tokens_BxN) -> (objective_B, act_B, xent_B), B split along "data"."""
    whole, split = PartitionSpec(), PartitionSpec(sharding.DATA)
    body = jax.shard_map(functools.partial(_score_local, st=st), mesh=mesh,
                         in_specs=(whole, whole, whole, whole, split), out_specs=(split, split, split),
                         axis_names=frozenset({sharding.DATA}), check_vma=False)
    return ExportedJit(body, "full_evaluator", key=(st, mesh))


@functools.lru_cache(maxsize=KEPT_SEARCHES * SUFFIX_BUCKETS)
def suffix_evaluator(st: Statics, mesh: Mesh, start: int):
    """jit(params, sae, arrays, prefix, parents, tokens_BxN, parent_B) -> (objective_B, act_B, xent_B)."""
    whole, split = PartitionSpec(), PartitionSpec(sharding.DATA)
    body = jax.shard_map(functools.partial(score_suffix, st=st, start=start), mesh=mesh,
                         in_specs=(whole, whole, whole, whole, whole, split, split), out_specs=(split, split, split),
                         axis_names=frozenset({sharding.DATA}), check_vma=False)
    return ExportedJit(body, f"suffix_evaluator/{start}", key=(st, mesh, start))


def bucket_starts(n_tokens: int, buckets: int = SUFFIX_BUCKETS) -> tuple[int, ...]:
    """The start positions a suffix may begin at: 0 (the whole prompt) and every step-th position."""
    step = max(1, math.ceil(n_tokens / buckets))
    return tuple(range(0, n_tokens, step))


def first_changes(children_BxN: np.ndarray, parents_BxN: np.ndarray) -> np.ndarray:
    """Per child, the first position where it differs from its parent (N where it does not)."""
    differs_BxN = children_BxN != parents_BxN
    return np.where(differs_BxN.any(-1), differs_BxN.argmax(-1), children_BxN.shape[1])


# ----------------------------------------------------------------------------------------------
# The host side: which children run, in which bucket


@dataclass
class EvaluationCounts:
    """What an iteration's evaluation did, for `bench` and tests."""

    children: int = 0  # proposed
    run: int = 0  # actually run through the model (the rest reused a score)
    known: int = 0  # distinct children scored in an earlier iteration (a ScoreCache held them)
    positions: int = 0  # optimized positions run, padding included
    calls: dict[int, int] | None = None  # per bucket start: calls made

    def add_call(self, start: int) -> None:
        self.calls = self.calls or {}
        self.calls[start] = self.calls.get(start, 0) + 1


class ChildScorer:
    """Scores batches of prompts on a mesh; children through their parents' suffix buckets. Each bucket
    start is its own executable, compiled the first time a batch needs it (the persistent compilation
    cache keeps it for later runs)."""

    def __init__(self, st: Statics, mesh: Mesh, params, sae, arrays, prefix: Prefix, chunk: int | None = None):
        self.st, self.mesh = st, mesh
        self.params, self.sae, self.arrays, self.prefix = params, sae, arrays, prefix
        n_data = sharding.data_size(mesh)
        per_device = chunk or min(EVAL_CHUNK, max(8, 1 << max(0, math.ceil(math.log2(st.elites * st.candidates / 8)))))
        self.chunk = per_device * n_data  # prompts per call, split along "data"
        self.starts = bucket_starts(st.prompt_tokens)
        self._full = full_evaluator(st, mesh)
        self.last = EvaluationCounts()

    # -- any batch, every position

    def full(self, tokens_BxN: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(objective, act, xent) of any batch of optimized tokens, every position run; in calls of
        `chunk` prompts, the shape the children's whole-prompt calls have too (one executable for both)."""
        B = len(tokens_BxN)
        out = np.zeros((3, B), np.float32)
        for lo in range(0, B, self.chunk):
            rows = tokens_BxN[lo:lo + self.chunk]
            padded = np.concatenate([rows, np.repeat(rows[:1], self.chunk - len(rows), 0)])
            outs = self._full(self.params, self.sae, self.arrays, self.prefix, self._split(padded))
            out[:, lo:lo + len(rows)] = np.stack([np.asarray(o, np.float32) for o in outs])[:, :len(rows)]
        return out[0], out[1], out[2]

    def _split(self, array: np.ndarray) -> jax.Array:
        # converted on the host: a conversion on the device would be one more compiled step
        return jax.device_put(np.asarray(array, np.int32), NamedSharding(self.mesh, PartitionSpec(sharding.DATA)))

    # -- an iteration's children

    def children(self, children_BxN: np.ndarray, parent_B: np.ndarray, elites_KxN: np.ndarray,
                 elite_scores: tuple[np.ndarray, np.ndarray, np.ndarray], parents: Parents,
                 known: ScoreCache | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(objective_B, act_B, xent_B) of children (child b of elite parent_B[b]).

        `parents` is the gradient pass's `Parents` of `elites_KxN`, whose scores are `elite_scores`. A
        child `known` holds is not run; the children that run are added to it.
        """
        B, N = children_BxN.shape
        parents = self._whole(parents)
        out = np.zeros((3, B), np.float32)
        first_B = first_changes(children_BxN, elites_KxN[parent_B])
        counts = EvaluationCounts(children=B)
        # a child equal to its parent has the parent's score
        same = first_B == N
        out[:, same] = np.stack(elite_scores)[:, parent_B[same]]
        todo: dict[bytes, tuple[int, list[int]]] = {}  # prompt -> (the child that runs, all its copies)
        for b in np.flatnonzero(~same):
            key = children_BxN[b].tobytes()
            if key in todo:
                rep, members = todo[key]
                members.append(b)
                if first_B[b] > first_B[rep]:  # the copy sharing the longest start with its parent runs
                    todo[key] = (b, members)
            else:
                todo[key] = (b, [b])
        if known is not None:
            for key in list(todo):
                scores = known.get(key)
                if scores is not None:
                    out[:, todo.pop(key)[1]] = np.asarray(scores, np.float32)[:, None]
                    counts.known += 1
        reps = np.array([rep for rep, _ in todo.values()], np.int64)
        if len(reps):
            results = self._run(children_BxN[reps], parent_B[reps], first_B[reps], parents, counts)
            for (_, members), result in zip(todo.values(), results.T):
                out[:, members] = result[:, None]
            if known is not None:
                known.add(children_BxN[reps], *results)
        self.last = counts
        return out[0], out[1], out[2]

    def _run(self, tokens_RxN, parent_R, first_R, parents: Parents, counts: EvaluationCounts) -> np.ndarray:
        """3xR scores of distinct prompts: sorted by first change (latest first), cut into calls of
        `chunk`, each starting at the latest bucket start ready and not after its earliest change."""
        R, N = tokens_RxN.shape
        order = np.argsort(-first_R, kind="stable")
        results = np.zeros((3, R), np.float32)
        counts.run = R
        for lo in range(0, R, self.chunk):
            rows = order[lo:lo + self.chunk]
            padded = np.concatenate([rows, np.repeat(rows[:1], self.chunk - len(rows))])
            start = max(s for s in self.starts if s <= first_R[rows].min())
            counts.add_call(start)
            counts.positions += self.chunk * (N - start)
            outs = self._call(start, tokens_RxN[padded], parent_R[padded], parents)
            results[:, rows] = np.stack([np.asarray(o, np.float32) for o in outs])[:, :len(rows)]
        return results

    def _call(self, start: int, tokens_BxN: np.ndarray, parent_B: np.ndarray, parents: Parents):
        """(objective_B, act_B, xent_B) of one call of B = `chunk` prompts at a bucket start (0: every position)."""
        tokens = self._split(tokens_BxN)
        if not start:
            return self._full(self.params, self.sae, self.arrays, self.prefix, tokens)
        return suffix_evaluator(self.st, self.mesh, start)(self.params, self.sae, self.arrays, self.prefix, parents,
                                                           tokens, self._split(parent_B))

    def warm_up(self, parents: Parents) -> None:
        """Runs one call at every bucket start on dummy prompts, so that no later call compiles: for
        benchmarks that time the search rather than XLA. `parents` as `children` gets them."""
        tokens, parent = np.zeros((self.chunk, self.st.prompt_tokens), np.int32), np.zeros(self.chunk, np.int32)
        for start in self.starts:
            jax.block_until_ready(self._call(start, tokens, parent, self._whole(parents)))

    def compiled_call(self, start: int, parents: Parents):
        """The compiled executable of one call at this bucket start (0: every position), for XLA's cost
        analysis; `parents` as `children` gets them."""
        tokens = self._split(np.zeros((self.chunk, self.st.prompt_tokens), np.int32))
        if not start:
            return self._full.lower(self.params, self.sae, self.arrays, self.prefix, tokens).compile()
        parent = self._split(np.zeros(self.chunk, np.int32))
        return suffix_evaluator(self.st, self.mesh, start).lower(self.params, self.sae, self.arrays, self.prefix,
                                                                 self._whole(parents), tokens, parent).compile()

    def _whole(self, parents: Parents) -> Parents:
        return jax.device_put(parents, NamedSharding(self.mesh, PartitionSpec()))

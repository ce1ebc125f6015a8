"""Evolutionary prompt optimization (DESIGN.md §3): K elites along the activation/fluency frontier.

One iteration is three jitted functions with static shapes, then selection on the host:
  1. `gradients`: d f_k / d one-hot tokens of elite k (KxNxV), each position's next-token logits, and
     what the elites' children may reuse of their pass (keys and values, per-position values);
  2. `propose`: C children per elite (resample positions from the parent's logits, masked to the
     top-k tokens by gradient unless skipped; sometimes swap two positions);
  3. evaluation (engine/evaluation.py): objective, reported activation and xent of all KxC children,
     each running only from (about) its first changed position, split along the mesh's "data" axis
     (its "model" axis splits every layer's weights: engine/sharding.py);
then each elite k keeps the best f_k = objective - lambda_k * scale/10 * xent (engine/penalty_scale.py)
over itself, the other elites and the children whose text re-tokenizes to the same ids, among the
prompts no earlier elite took. What a reader sees of each elite is
engine/reporting.py's (`elite_reports`).

Shapes: K elites, C children per elite (`search.candidates`), B = K*C, N optimized tokens, V vocabulary, F features,
P prefix length (BOS + prefix).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epo_tui import dataset_stats
from epo_tui.config import Config, SearchConfig
from epo_tui.engine.frontier import Frontier
from epo_tui.engine import penalty_scale, sampling, sharding
from epo_tui.engine.evaluation import ChildScorer, Parents, Prefix, Statics, score
from epo_tui.engine.export_cache import exported_jit
from epo_tui.engine.language_model import run_model
from epo_tui.engine.objective import build_target, combine
from epo_tui.engine.pairing import ModelWithSAE
from epo_tui.engine.score_cache import ScoreCache
from epo_tui.errors import UserError, require_utf8

SAMPLING_ATTEMPTS = 20  # model samples tried per elite before falling back to copies of valid ones
# attempts after which a model none of whose samples re-tokenized (an untrained one) stops sampling
HOPELESS_AFTER = 3


@dataclass
class SearchState:
    iteration: int
    tokens_KxN: np.ndarray  # int32
    objective_K: np.ndarray
    act_K: np.ndarray
    xent_K: np.ndarray
    key: np.ndarray  # raw jax PRNG key data (uint32)
    frontier: Frontier = field(default_factory=Frontier)
    best_objective_history: list[float] = field(default_factory=list)
    scored: ScoreCache = field(default_factory=ScoreCache)  # prompts already run, not run again


@dataclass
class Timings:
    gradients: float = 0.0
    proposals: float = 0.0
    evaluation: float = 0.0
    selection: float = 0.0

    @property
    def total(self) -> float:
        return self.gradients + self.proposals + self.evaluation + self.selection


def penalties(search: SearchConfig) -> np.ndarray:
    """lambda_k, log-spaced over [penalty_min, penalty_max]."""
    return np.geomspace(search.penalty_min, search.penalty_max, search.elites).astype(np.float32)


@exported_jit(static_argnames=("st",))
def gradients(params, sae, arrays, prefix, tokens_KxN, xent_weights_K, *, st: Statics):
    """(grad_KxNxV of f_k = objective - xent_weights_K[k] * xent w.r.t. elite k's one-hot tokens, the
    elites' `Parents`: what their children reuse, with the next-token logits_KxNxV the proposals draw
    from)."""

    def total_fitness(onehot_KxNxV):
        objective_K, _, xent_K, parents = score(params, sae, arrays, prefix, onehot_KxNxV, st, keep=True)
        return (objective_K - xent_weights_K * xent_K).sum(), parents

    onehot = jax.nn.one_hot(tokens_KxN, st.cfg.vocab_size, dtype=jnp.float32)
    return jax.grad(total_fitness, has_aux=True)(onehot)


@exported_jit(static_argnames=("st",))
def propose(key, tokens_KxN, grads_KxNxV, next_logits_KxNxV, banned_V, *, st: Statics):
    """children_KxCxN, in three operations: each child resamples one uniform position plus each other with
    p = extra/N (`positions_to_resample`), its new tokens drawn from the parent's next-token logits / T,
    T ~ U(0, T_max), among the top-k tokens by gradient, or, with p = skip_gradient_mask, among the
    likeliest `unmasked_top` (`drawn_tokens`); then, with p = swap, two of its positions swap
    (`with_two_positions_swapped`)."""
    K, N = tokens_KxN.shape
    keys = jax.random.split(key, 8)
    resample_KxCxN = positions_to_resample(keys[0], keys[1], K, N, st)
    temperature_KxCx1x1 = jax.random.uniform(keys[2], (K, st.candidates, 1, 1), minval=1e-3, maxval=st.temperature_max)
    new_KxCxN = drawn_tokens(keys[3:6], grads_KxNxV, jnp.where(banned_V, -jnp.inf, next_logits_KxNxV), banned_V,
                             temperature_KxCx1x1, st)
    children_KxCxN = jnp.where(resample_KxCxN, new_KxCxN, tokens_KxN[:, None, :]).astype(jnp.int32)
    return with_two_positions_swapped(keys[6], keys[7], children_KxCxN, st)


def positions_to_resample(first_key, extra_key, K: int, N: int, st: Statics):
    """resample_KxCxN: one uniform position of each child, and each other with p = extra_resample / N."""
    first_KxC = jax.random.randint(first_key, (K, st.candidates), 0, N)
    return (jax.random.uniform(extra_key, (K, st.candidates, N)) < st.extra_resample / N) | (
        jnp.arange(N) == first_KxC[..., None])


def drawn_tokens(keys, grads_KxNxV, logits_KxNxV, banned_V, temperature_KxCx1x1, st: Statics):
    """new_KxCxN: a token per child and position by softmax(logits / T), among the top-k tokens by gradient,
    or, for a child that skips the gradient mask (p = skip_gradient_mask), among the `unmasked_top`
    likeliest. `keys`: (slots, masked draw, unmasked draw); `logits_KxNxV` with banned tokens at -inf.

    Drawing among `unmasked_top` tokens costs that many Gumbel numbers per child and position, so it is
    done only for S = ceil(p C) random children of each elite ("slots"), each of which then skips the
    mask with probability pC/S: every child still skips with probability exactly p, at S/C the cost."""
    slot_key, masked_key, unmasked_key = keys
    K, N, _ = logits_KxNxV.shape
    C = st.candidates

    def sample_from(choices_KxNxT, temperature_KxXx1x1, key):
        """A token per child and position, drawn among `choices` by softmax(logits / T)."""
        chosen_logits_KxNxT = jnp.take_along_axis(logits_KxNxV, choices_KxNxT, axis=-1)
        X = temperature_KxXx1x1.shape[1]
        gumbel = jax.random.gumbel(key, (K, X, N, choices_KxNxT.shape[-1]))
        scores = chosen_logits_KxNxT[:, None] / temperature_KxXx1x1 + gumbel
        picked_KxXxN = jnp.argmax(scores, axis=-1)
        return jnp.take_along_axis(jnp.broadcast_to(choices_KxNxT[:, None], scores.shape),
                                   picked_KxXxN[..., None], axis=-1)[..., 0]

    _, by_gradient_KxNxT = jax.lax.top_k(jnp.where(banned_V, -jnp.inf, grads_KxNxV), st.topk)
    new_KxCxN = sample_from(by_gradient_KxNxT, temperature_KxCx1x1, masked_key)
    slots = math.ceil(st.skip_gradient_mask * C)
    if not slots:
        return new_KxCxN
    _, by_logit_KxNxM = jax.lax.top_k(logits_KxNxV, st.unmasked_top)
    slot_KxS = jnp.argsort(jax.random.uniform(slot_key, (K, C)), axis=1)[:, :slots]  # distinct children
    skips_KxS = jax.random.uniform(jax.random.fold_in(slot_key, 1), (K, slots)) < st.skip_gradient_mask * C / slots
    slot_KxSxN = jnp.broadcast_to(slot_KxS[..., None], (K, slots, N))
    slot_temperature_KxSx1x1 = jnp.take_along_axis(temperature_KxCx1x1, slot_KxS[..., None, None], axis=1)
    unmasked_KxSxN = sample_from(by_logit_KxNxM, slot_temperature_KxSx1x1, unmasked_key)
    kept_KxSxN = jnp.take_along_axis(new_KxCxN, slot_KxSxN, axis=1)
    return jnp.put_along_axis(new_KxCxN, slot_KxSxN, jnp.where(skips_KxS[..., None], unmasked_KxSxN, kept_KxSxN),
                              axis=1, inplace=False)


def with_two_positions_swapped(choose_key, position_key, children_KxCxN, st: Statics):
    """The children, each with p = swap two of its positions (uniform, distinct) exchanged."""
    K, C, N = children_KxCxN.shape
    do_swap_KxC = (jax.random.uniform(choose_key, (K, C)) < st.swap) & (N > 1)
    i_KxC = jax.random.randint(position_key, (K, C), 0, N)
    shift_KxC = jax.random.randint(jax.random.fold_in(position_key, 1), (K, C), 0, max(N - 1, 1))
    j_KxC = (i_KxC + 1 + shift_KxC) % N  # a uniform position other than i
    at_i = jnp.take_along_axis(children_KxCxN, i_KxC[..., None], axis=-1)
    at_j = jnp.take_along_axis(children_KxCxN, j_KxC[..., None], axis=-1)
    positions = jnp.arange(N)
    swapped = jnp.where(positions == i_KxC[..., None], at_j,
                        jnp.where(positions == j_KxC[..., None], at_i, children_KxCxN))
    return jnp.where(do_swap_KxC[..., None], swapped, children_KxCxN)


def local_mesh(model_parallel: int = 1) -> Mesh:
    """This process's devices as a ("data", "model") mesh, `model_parallel` of them splitting each layer."""
    return sharding.make_mesh(model_parallel)


# ----------------------------------------------------------------------------------------------
# The search


class Search:
    """An EPO search for one target. `initial_state()`, then `step(state)` once per iteration."""

    def __init__(self, pair: ModelWithSAE, config: Config, mesh: Mesh | None = None):
        self.pair, self.config = pair, config
        search = config.search
        model = pair.model
        self.target, self.arrays = build_target(pair, config.feature, config.source)
        self.mesh = mesh or pair.mesh
        hooks = () if self.target.kind == "logit" else (self.target.hook,)
        self.st = Statics(model_type=model.model_type, cfg=model.cfg, center_writes=pair.center_writes,
                          target=self.target, hooks=hooks, elites=search.elites, candidates=search.candidates,
                          prompt_tokens=search.prompt_tokens, topk=min(search.topk, model.vocab_size),
                          unmasked_top=min(search.unmasked_top, model.vocab_size),
                          extra_resample=search.extra_resample, skip_gradient_mask=search.skip_gradient_mask,
                          swap=search.swap, temperature_max=search.temperature_max)
        self.lambdas_K = penalties(search)
        self.prefix_ids = model.encode("", search.prefix)
        if len(self.prefix_ids) + search.prompt_tokens > model.cfg.max_positions:
            raise UserError(f"search.prompt_tokens: {search.prompt_tokens} tokens after a "
                            f"{len(self.prefix_ids)}-token prefix exceed the model's {model.cfg.max_positions}")
        self.banned_V = self._banned_tokens(search.banned_tokens)
        self._banned_np = np.asarray(self.banned_V)
        self.params, self.sae = pair.placed(self.mesh)
        logits_1xPxV, _, kv = run_model(self.params, jnp.asarray([self.prefix_ids], jnp.int32), None,
                                        model_type=self.st.model_type, cfg=self.st.cfg, hooks=(), logits=True,
                                        center_writes=self.st.center_writes, keep_kv=True)
        self.prefix = jax.device_put(Prefix(kv=kv, next_logits_V=logits_1xPxV[0, -1]),
                                     NamedSharding(self.mesh, PartitionSpec()))  # small: on every device
        self.objective_scale = self._objective_scale()
        if self.objective_scale.features:  # several latents: each divided by its own scale
            self.arrays = dataclasses.replace(self.arrays, scales_F=jnp.asarray(self.objective_scale.features,
                                                                                 jnp.float32))
        # f_k = objective - xent_weights_K[k] * xent: lambda_k priced in the scale (engine/penalty_scale.py)
        self.xent_weights_K = self.objective_scale.xent_weights(self.lambdas_K)
        self.scorer = ChildScorer(self.st, self.mesh, self.params, self.sae, self.arrays, self.prefix)
        self._valid_cache: dict[bytes, bool] = {}

    # -- set-up

    def _objective_scale(self) -> penalty_scale.ObjectiveScale:
        """search.penalty_scale's scale (engine/penalty_scale.py): an SAE latent's dataset maximum where
        the dataset statistics know it, else measured over K prompts the model samples with a fixed key
        (not the search's seed: every seed of one target prices a nat the same). Several SAE latents get
        one scale each."""
        choice = self.config.search.penalty_scale
        if choice == "none":
            return penalty_scale.ObjectiveScale(1.0, penalty_scale.NONE)
        several = self.target.kind == "sae" and self.target.n_features > 1
        if choice == "auto" and self.target.kind == "sae":
            known = [penalty_scale.from_dataset(m) for m in self._dataset_maxima(self.config.feature.features)]
            scale = penalty_scale.per_feature(known) if several else known[0]
            if scale is not None:
                return scale
        K, N = self.st.elites, self.st.prompt_tokens
        sampled = sampling.sample_continuations(self.params, self.prefix, jax.random.key(0),
                                                jnp.zeros((K, N), jnp.int32), 0, self.banned_V, st=self.st)
        _, parents = gradients(self.params, self.sae, self.arrays, self.prefix, sampled,
                               jnp.zeros(K, jnp.float32), st=self.st)
        values_KxNxF = np.asarray(parents.optimized_KxNxF)
        if several:
            scale = penalty_scale.per_feature([penalty_scale.measured(values_KxNxF[..., f])
                                               for f in range(values_KxNxF.shape[-1])])
            return scale or penalty_scale.ObjectiveScale(1.0, penalty_scale.NONE)
        return penalty_scale.measured(np.asarray(combine(self.target, jnp.asarray(values_KxNxF))))

    def _dataset_maxima(self, latents: tuple[int, ...]) -> list[float | None]:
        """Each latent's maximum in the SAE's dataset statistics (None where unknown); all None without
        statistics or with a damaged store: the search then measures its scale rather than refusing to run."""
        try:
            stats = dataset_stats.load_best_stats(dataset_stats.sae_key(self.pair.model.name,
                                                                        self.pair.sae.display_name))
        except UserError:
            stats = None
        return [stats.max(i) if stats is not None and i < stats.d_sae else None for i in latents]

    def _banned_tokens(self, banned: tuple[str, ...]) -> jax.Array:
        model = self.pair.model
        mask = np.zeros(model.vocab_size, bool)
        mask[model.special_token_ids()] = True
        tokenizer = model.tokenizer
        for text in banned:
            require_utf8(text, f"search.banned_tokens: {text!r}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise UserError(f"search.banned_tokens: '{text}' is {len(ids)} tokens, not one")
            mask[ids[0]] = True
        # ids past the tokenizer's vocabulary (padding rows of the embedding) decode to nothing
        mask[len(tokenizer):] = True
        return jnp.asarray(mask)

    def initial_state(self, seed_text: str | None = None, what: str = "the seed prompt") -> SearchState:
        """Elites sampled from the model after the prefix (or continuing `seed_text`), all valid.

        Raises UserError when `seed_text` (called `what` in the message) holds a special or banned
        token: no elite may hold one, whatever its source.
        """
        search = self.config.search
        K, N = search.elites, search.prompt_tokens
        key = jax.random.key(search.seed)
        setup_key, steps_key = jax.random.split(key)  # set-up sampling never reuses a step's key
        start = np.zeros((K, N), np.int32)
        n_start = 0
        if seed_text:
            seed_ids = self.pair.model.prompt_ids(seed_text, what)[:N]
            banned = [i for i, ok in zip(seed_ids, self._allowed(seed_ids)) if not ok]
            if banned:
                names = ", ".join(dict.fromkeys(repr(self.pair.model.decode([i])) for i in banned))
                raise UserError(f"{what} holds {names}, which search.banned_tokens bans")
            n_start = len(seed_ids)
            start[:, :n_start] = seed_ids
        tokens, valid = start.copy(), np.zeros(K, bool)
        attempts = SAMPLING_ATTEMPTS
        if n_start == N:  # the seed fills every position: nothing to sample
            valid[:], attempts = self.is_valid(start[0]), 0
        for attempt in range(attempts):
            attempt_key = jax.random.fold_in(setup_key, attempt)
            sampled = np.asarray(sampling.sample_continuations(self.params, self.prefix, attempt_key, jnp.asarray(start),
                                                               n_start, self.banned_V, st=self.st))
            newly = ~valid & np.array([self.is_valid(row) for row in sampled])
            tokens[newly], valid = sampled[newly], valid | newly
            if valid.all() or (attempt + 1 >= HOPELESS_AFTER and not valid.any()):
                break
        if not valid.any():  # a model whose samples rarely re-tokenize (e.g. untrained): build one
            tokens[0], valid[0] = self._round_tripping_prompt(start[0], n_start, np.random.default_rng(search.seed),
                                                              what), True
        tokens[~valid] = tokens[np.flatnonzero(valid)[np.arange((~valid).sum()) % valid.sum()]]
        objective, act, xent = self.evaluate(tokens)
        state = SearchState(iteration=0, tokens_KxN=tokens, objective_K=objective, act_K=act, xent_K=xent,
                            key=np.asarray(jax.random.key_data(steps_key)))
        state.frontier = state.frontier.merged(xent, objective, act, tokens)
        state.scored.add(tokens, objective, act, xent)
        return state

    def _round_tripping_prompt(self, start_N: np.ndarray, n_start: int, rng: np.random.Generator,
                               what: str = "the seed prompt") -> np.ndarray:
        """Keeps `start_N[:n_start]` and appends random allowed tokens, each kept only if the prompt so
        far still re-tokenizes to itself."""
        allowed = np.flatnonzero(~np.asarray(self.banned_V))
        tokens = list(start_N[:n_start])
        if tokens and not self.is_valid(np.array(tokens)):
            raise UserError(f"{what} does not re-tokenize to its own tokens after search.prefix once cut to "
                            f"search.prompt_tokens = {len(start_N)} tokens (a cut inside a character or a word does "
                            f"that): shorten it")
        for candidate in rng.permutation(allowed):
            if len(tokens) == len(start_N):
                break
            if self.is_valid(np.array(tokens + [candidate])):
                tokens.append(int(candidate))
        if len(tokens) < len(start_N):
            raise UserError("could not build a starting prompt that re-tokenizes to itself")
        return np.array(tokens, np.int32)

    def warm_up(self) -> None:
        """Compiles everything an iteration may run (the gradient pass, the proposals, the evaluation at
        every suffix bucket) by running each once from the starting elites; the search's state is not
        touched. For benchmarks that time the search rather than XLA's compiler."""
        state = self.initial_state()
        tokens = jnp.asarray(state.tokens_KxN)
        key = self._iteration_key(state)
        grads, parents = gradients(self.params, self.sae, self.arrays, self.prefix, tokens,
                                   jnp.asarray(self.xent_weights_K), st=self.st)
        jax.block_until_ready(propose(key, tokens, grads, parents.next_logits_KxNxV, self.banned_V, st=self.st))
        self.scorer.warm_up(parents)

    # -- one iteration

    def evaluate(self, tokens_BxN: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(objective, act, xent) of any batch of optimized tokens, every position run, sharded over the mesh."""
        return self.scorer.full(tokens_BxN)

    def evaluate_children(self, children_BxN: np.ndarray, state: SearchState, parents: Parents,
                          scored: ScoreCache | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(objective, act, xent) of the elites' children, C per elite in order; each runs only from
        (about) its first change on, reusing its parent's pass (`parents`, from `gradients`). Children
        `scored` holds are not run; those that run are added to it."""
        parent_B = np.repeat(np.arange(self.st.elites), self.st.candidates)
        return self.scorer.children(children_BxN, parent_B, state.tokens_KxN,
                                    (state.objective_K, state.act_K, state.xent_K), parents, scored)

    def step(self, state: SearchState) -> tuple[SearchState, Timings]:
        timings = Timings()
        key = self._iteration_key(state)
        tokens = jnp.asarray(state.tokens_KxN)

        t0 = time.perf_counter()
        grads, parents = gradients(self.params, self.sae, self.arrays, self.prefix, tokens,
                                   jnp.asarray(self.xent_weights_K), st=self.st)
        jax.block_until_ready(grads)
        t1 = time.perf_counter()
        children = propose(key, tokens, grads, parents.next_logits_KxNxV, self.banned_V, st=self.st)
        children_BxN = np.asarray(children).reshape(-1, self.st.prompt_tokens)
        t2 = time.perf_counter()
        scored = state.scored.copy()  # the state stepped from stays as it was
        objective, act, xent = self.evaluate_children(children_BxN, state, parents, scored)
        t3 = time.perf_counter()
        state = self._select(state, children_BxN, objective, act, xent, scored)
        t4 = time.perf_counter()
        timings.gradients, timings.proposals, timings.evaluation, timings.selection = t1 - t0, t2 - t1, t3 - t2, t4 - t3
        return state, timings

    @staticmethod
    def _iteration_key(state: SearchState) -> jax.Array:
        """The PRNG key of the iteration that steps from `state`: its seed's key folded with the iteration."""
        return jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state.key)), state.iteration)

    def _select(self, state: SearchState, children_BxN, objective, act, xent, scored: ScoreCache) -> SearchState:
        """Elite k (in order of lambda) keeps the best f_k among the elites and the valid children whose
        prompt no earlier elite took (elites win ties), so the K elites are K distinct prompts whenever
        the pool holds that many. Only when every valid prompt is taken does it share one.

        No prompt is lost by this: the pool's best prompt for lambda_k is elite k's or an earlier
        elite's, so max_j f_k(elite j) is the pool's best f_k and never falls from one iteration to
        the next.
        """
        pool_tokens = np.concatenate([state.tokens_KxN, children_BxN])
        pool_obj = np.concatenate([state.objective_K, objective])
        pool_act = np.concatenate([state.act_K, act])
        pool_xent = np.concatenate([state.xent_K, xent])
        K = len(state.tokens_KxN)
        chosen, taken = [], set()
        for weight in self.xent_weights_K:
            fitness = pool_obj - weight * pool_xent
            best_valid = None
            for i in np.argsort(-fitness, kind="stable"):
                if not (i < K or self.is_valid(pool_tokens[i])):
                    continue
                best_valid = i if best_valid is None else best_valid
                if pool_tokens[i].tobytes() not in taken:
                    break
            else:
                i = best_valid  # every valid prompt is some earlier elite's already
            chosen.append(i)
            taken.add(pool_tokens[i].tobytes())
        chosen = np.array(chosen)
        frontier = self._update_frontier(state.frontier, children_BxN, objective, act, xent)
        return SearchState(iteration=state.iteration + 1, tokens_KxN=pool_tokens[chosen].copy(),
                           objective_K=pool_obj[chosen], act_K=pool_act[chosen], xent_K=pool_xent[chosen],
                           key=state.key, frontier=frontier, scored=scored,
                           best_objective_history=[*state.best_objective_history, float(pool_obj[chosen].max())])

    def _update_frontier(self, frontier: Frontier, tokens, objective, act, xent) -> Frontier:
        """Children that enter the frontier, once their text re-tokenizes to their ids."""
        alive = np.ones(len(tokens), bool)
        while True:
            idx = np.flatnonzero(alive)
            entering = idx[frontier.candidates_that_enter(xent[idx], act[idx])]
            invalid = [i for i in entering if not self.is_valid(tokens[i])]
            if not invalid:
                break
            alive[invalid] = False
        if len(entering) == 0:
            return frontier
        return frontier.merged(xent[entering], objective[entering], act[entering], tokens[entering])

    def is_valid(self, tokens_N: np.ndarray) -> bool:
        """Whether a prompt may enter the elites, the frontier or a report: it holds no special or
        banned id, and its text, placed after the prefix's text as the model reads it, re-tokenizes to
        exactly the prefix's ids and then these (so a prompt whose text spells `<|endoftext|>`, or
        whose first token would merge with the prefix, is not valid). Cached."""
        tokens_N = np.asarray(tokens_N, np.int32)
        key = tokens_N.tobytes()
        if key not in self._valid_cache:
            if len(self._valid_cache) > 200_000:
                self._valid_cache.clear()
            self._valid_cache[key] = self._allowed(tokens_N).all() and self._round_trips(tokens_N)
        return self._valid_cache[key]

    def _allowed(self, ids: np.ndarray) -> np.ndarray:
        """Per id: inside the vocabulary, and neither special nor banned."""
        ids = np.asarray(ids, np.int64)
        inside = (ids >= 0) & (ids < len(self._banned_np))
        return inside & ~self._banned_np[np.where(inside, ids, 0)]

    def _round_trips(self, tokens_N: np.ndarray) -> bool:
        model, prefix = self.pair.model, self.config.search.prefix
        again = model.tokenizer(prefix + model.decode(tokens_N), add_special_tokens=False)["input_ids"]
        return list(again) == self.prefix_ids[1:] + tokens_N.tolist()

    def admissible(self, state: SearchState) -> SearchState:
        """`state` with every prompt that is not valid (`is_valid`) gone: such an elite becomes a copy
        of a valid one, such a frontier point is dropped. For a checkpoint written by an older
        version, or by hand: a resumed search never carries a special or banned id on. With no valid
        elite left, the elites are sampled afresh."""
        valid_K = np.array([self.is_valid(row) for row in state.tokens_KxN])
        frontier = state.frontier
        kept = [i for i in range(len(frontier)) if self.is_valid(frontier.tokens[i])]
        if valid_K.all() and len(kept) == len(frontier):
            return state
        if len(kept) < len(frontier):
            frontier = Frontier(xent=frontier.xent[kept], objective=frontier.objective[kept], act=frontier.act[kept],
                                tokens=frontier.tokens[kept])
        if not valid_K.any():
            fresh = self.initial_state()
            return dataclasses.replace(fresh, iteration=state.iteration, key=state.key,
                                       frontier=frontier.merged(fresh.xent_K, fresh.objective_K, fresh.act_K,
                                                                fresh.tokens_KxN),
                                       best_objective_history=state.best_objective_history)
        donor_K = np.flatnonzero(valid_K)[np.cumsum(~valid_K) % valid_K.sum()]
        take = np.where(valid_K, np.arange(len(valid_K)), donor_K)
        return dataclasses.replace(state, tokens_KxN=state.tokens_KxN[take].copy(), objective_K=state.objective_K[take],
                                   act_K=state.act_K[take], xent_K=state.xent_K[take], frontier=frontier)

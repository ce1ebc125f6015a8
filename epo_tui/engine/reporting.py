"""What a search reports: each elite as a reader needs it (`elite_reports`: tokens, per-token activations,
act, xent, in float32 whatever the weights' dtype), and, once it finished or stopped, the result.json
content and a short label."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from epo_tui import results
from epo_tui.config import Config
from epo_tui.engine.distributed import Cluster
from epo_tui.engine.evaluation import Prefix, Statics, score
from epo_tui.engine.export_cache import exported_jit
from epo_tui.engine.language_model import apply_model
from epo_tui.engine.objective import combine, per_position
from epo_tui.engine.search import Search, SearchState
from epo_tui.protocol import Elite, OptimizedFeature
from epo_tui.text import token_text


def feature_record(search: Search) -> OptimizedFeature:
    """What was optimized, with the feature indices as the search resolved them."""
    feature = search.config.feature
    return OptimizedFeature(kind=feature.kind, indices=[int(i) for i in np.asarray(search.arrays.indices_F)],
                            combine=feature.combine, lp_p=feature.lp_p, lp_offset=feature.lp_offset,
                            read=feature.read, hook=search.target.hook)


def result_of(search: Search, state: SearchState, timings: results.RunTimings, cluster: Cluster = Cluster(),
              elites: list[Elite] | None = None) -> dict:
    """The result.json content of a search in the state it reached (`elites`: its elite_reports, when
    the caller has them already)."""
    model, sae = search.pair.model, search.pair.sae
    return results.build_result(
        config=search.config.to_dict(), feature=feature_record(search), model=model.name,
        sae={"name": sae.display_name, "hook": sae.hook_name}, timings=timings,
        frontier=state.frontier.to_json(model.decode), best_objective_history=state.best_objective_history,
        elites=elites if elites is not None else elite_reports(search, state),
        process=cluster.to_json(), penalty_scale=search.objective_scale.to_json())


def features_label(config: Config) -> str:
    features = config.feature.features
    return f"feature {features[0]}" if len(features) == 1 else f"features {'+'.join(map(str, features))}"


# ----------------------------------------------------------------------------------------------
# Each elite as a reader needs it


def _upcast(params):
    """The weights in float32, cast inside a jitted function (so no float32 copy outlives it)."""
    return jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


@exported_jit(static_argnames=("st", "upcast"))
def _whole_prompt_activations(params, sae, arrays, full_tokens_KxL, *, st: Statics, upcast: bool):
    """(combined_KxL, per_feature_KxLxF) reported activations at every position of BOS+prefix+prompt;
    with `upcast`, computed in float32 from bfloat16 weights."""
    params = _upcast(params) if upcast else params
    logits, acts, _ = apply_model(params, full_tokens_KxL, None, model_type=st.model_type, cfg=st.cfg,
                                  hooks=st.hooks, logits=st.target.kind == "logit",
                                  center_writes=st.center_writes)
    _, reported_KxLxF = per_position(st.target, arrays, sae, acts.get(st.target.hook), logits)
    return combine(st.target, reported_KxLxF), reported_KxLxF


@exported_jit(static_argnames=("st",))
def _float32_scores(params, sae, arrays, prefix_ids_1xP, tokens_KxN, *, st: Statics):
    """(objective_K, act_K, xent_K) of prompts after the prefix, in float32 whatever the weights' dtype:
    what a bfloat16 search reports of its elites."""
    params = _upcast(params)
    logits_1xPxV, _, kv = apply_model(params, prefix_ids_1xP, None, model_type=st.model_type, cfg=st.cfg, hooks=(),
                                      logits=True, center_writes=st.center_writes, keep_kv=True)
    return score(params, sae, arrays, Prefix(kv=kv, next_logits_V=logits_1xPxV[0, -1]), tokens_KxN, st)[:3]


def elite_reports(search: Search, state: SearchState) -> list[Elite]:
    """Per elite (protocol.Elite): penalty, token ids/strings/bytes (hex) of the whole prompt (BOS and prefix included), the
    reported activation at every position, act, xent, objective, and the prompt's text.

    A search whose weights are not float32 (bfloat16) selects by its own figures, but reports each
    elite's act, xent, objective and activations recomputed in float32 from the same weights."""
    model = search.pair.model
    prefix = np.asarray(search.prefix_ids, np.int32)
    full = np.concatenate([np.broadcast_to(prefix, (len(state.tokens_KxN), len(prefix))), state.tokens_KxN], axis=1)
    upcast = model.dtype != "float32"
    combined_KxL, per_feature_KxLxF = (np.asarray(a) for a in _whole_prompt_activations(
        search.params, search.sae, search.arrays, jnp.asarray(full), st=search.st, upcast=upcast))
    objective_K, act_K, xent_K = state.objective_K, state.act_K, state.xent_K
    if upcast:
        objective_K, act_K, xent_K = (np.asarray(a) for a in _float32_scores(
            search.params, search.sae, search.arrays, jnp.asarray(prefix[None]), jnp.asarray(state.tokens_KxN),
            st=search.st))
    features = [int(i) for i in np.asarray(search.arrays.indices_F)]
    raw_bytes = [model.token_bytes(ids) for ids in full]
    return [Elite(penalty=float(search.lambdas_K[k]), token_ids=full[k].tolist(),
                  tokens=[token_text(b) for b in raw_bytes[k]], token_bytes=[b.hex() for b in raw_bytes[k]],
                  activations=[float(a) for a in combined_KxL[k]], act=float(act_K[k]), xent=float(xent_K[k]),
                  objective=float(objective_K[k]), prompt_start=len(prefix), text=model.decode(state.tokens_KxN[k]),
                  feature_activations={str(f): [float(a) for a in per_feature_KxLxF[k, :, i]]
                                       for i, f in enumerate(features)} if len(features) > 1 else None)
            for k in range(len(full))]

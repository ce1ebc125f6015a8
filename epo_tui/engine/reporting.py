"""What a finished (or stopped) search reports: the result.json content and a short label."""

from __future__ import annotations

import numpy as np

from epo_tui import results
from epo_tui.config import Config
from epo_tui.engine.distributed import Cluster
from epo_tui.engine.search import Search, SearchState, elite_reports
from epo_tui.protocol import Elite


def feature_record(search: Search) -> dict:
    """What was optimized, with the feature indices as the search resolved them."""
    feature = search.config.feature
    return {"kind": feature.kind, "indices": [int(i) for i in np.asarray(search.arrays.indices_F)],
            "combine": feature.combine, "lp_p": feature.lp_p, "lp_offset": feature.lp_offset,
            "read": feature.read, "hook": search.target.hook}


def result_of(search: Search, state: SearchState, timings: results.RunTimings, cluster: Cluster = Cluster(),
              elites: list[Elite] | None = None) -> dict:
    """The result.json content of a search in the state it reached (`elites`: its elite_reports, when
    the caller has them already)."""
    model, sae = search.pair.model, search.pair.sae
    return results.build_result(
        config=search.config.to_dict(), feature=feature_record(search), model=model.name,
        sae={"name": sae.display_name, "hook": sae.hook_name}, timings=timings,
        frontier=state.frontier.to_json(model.decode), best_objective_history=state.best_objective_history,
        elites=[e.to_json() for e in (elites if elites is not None else elite_reports(search, state))],
        process=cluster.to_json())


def features_label(config: Config) -> str:
    features = config.feature.features
    return f"feature {features[0]}" if len(features) == 1 else f"features {'+'.join(map(str, features))}"

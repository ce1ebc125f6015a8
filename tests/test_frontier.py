"""One frontier: the engine's (arrays, a whole iteration at once) and the chart's and sessions'
(epo_tui.pareto) keep the same points, on the design's axes (xent, act), under the same cap."""

from __future__ import annotations

import numpy as np

from epo_tui.engine.frontier import Frontier
from epo_tui.pareto import FRONTIER_MAX_POINTS, ParetoFrontier
from epo_tui.protocol import FrontierPoint


def test_the_engine_and_the_chart_keep_the_same_points():
    rng = np.random.default_rng(0)
    frontier, chart = Frontier(), ParetoFrontier()
    for iteration in range(30):
        xent = rng.uniform(1, 9, 64).astype(np.float32)
        act = rng.uniform(0, 10, 64).astype(np.float32)
        objective = act - 3 * xent  # another ranking entirely: it must not decide the frontier
        tokens = rng.integers(0, 50, (64, 4)).astype(np.int32)
        frontier = frontier.merged(xent, objective, act, tokens)
        for x, o, a, t in zip(xent, objective, act, tokens):
            chart.add(FrontierPoint(iteration=iteration, xent=float(x), objective=float(o), act=float(a),
                                    token_ids=t.tolist(), text=""))
    assert [(float(x), float(a)) for x, a in zip(frontier.xent, frontier.act)] == [(p.xent, p.act) for p in chart.points]
    assert np.all(np.diff(frontier.act) > 0)  # along xent, act only rises: no point dominates another


def test_past_the_shared_cap_both_ends_stay():
    n = FRONTIER_MAX_POINTS + 500
    xent = np.linspace(1, 9, n, dtype=np.float32)
    act = np.linspace(0, 10, n, dtype=np.float32)  # every point on the frontier
    tokens = np.arange(n, dtype=np.int32)[:, None]
    frontier = Frontier().merged(xent, act, act, tokens)
    assert len(frontier) <= FRONTIER_MAX_POINTS
    assert frontier.xent[0] == xent[0] and frontier.act[-1] == act[-1]  # the most fluent and the most active

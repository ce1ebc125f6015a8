"""What the worker answers about its saved sessions (`sessions`, `session`): real session folders,
the history reduced for a chart without changing the chart, and a line that stays within the limit."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from epo_tui import protocol, session_catalog, sessions
from epo_tui.pareto import ParetoFrontier
from epo_tui.protocol import FrontierPoint


def _session(root, **meta) -> sessions.Session:
    return sessions.create_session({"config": {}, "lambdas": [1.0], "model": "m", "feature": {"indices": [3]},
                                    "sae": {"name": "s", "hook": "h"}, "iterations_total": 10, **meta}, root)


def _points(iterations: int, per_iteration: int, text_tokens: int, seed: int = 0) -> list[FrontierPoint]:
    rng = random.Random(seed)
    return [FrontierPoint(iteration=i, xent=rng.uniform(1, 9), objective=0.0, act=rng.uniform(0, 10),
                          token_ids=[rng.randrange(50257) for _ in range(text_tokens)], text=" word" * text_tokens)
            for i in range(iterations) for _ in range(per_iteration)]


def _chart(points: list[FrontierPoint]) -> tuple[list[tuple[float, float]], dict[int, float]]:
    """What the frontier chart draws: the (xent, act) frontier and the best act of each iteration."""
    frontier: ParetoFrontier = ParetoFrontier()
    best: dict[int, float] = {}
    for p in points:
        frontier.add(p)
        best[p.iteration] = max(best.get(p.iteration, -np.inf), p.act)
    return [(p.xent, p.act) for p in frontier.points], best


def test_the_reduced_history_draws_the_same_chart():
    points = _points(iterations=300, per_iteration=5, text_tokens=4)
    reduced = session_catalog.history_for_chart(points)
    assert len(reduced) < len(points) / 2
    assert _chart(reduced) == _chart(points)
    on_frontier = set(_chart(points)[0])
    for p in reduced:  # only a frontier point keeps its prompt
        assert bool(p.text) == ((p.xent, p.act) in on_frontier)


def test_a_long_history_is_sent_in_one_line_within_the_limit(tmp_path):
    session = _session(tmp_path)
    session.append_history([p.to_json() for p in _points(iterations=6000, per_iteration=3, text_tokens=64)])
    details = session_catalog.session_details(session.id, tmp_path)
    line = protocol.encode(details)
    assert len(line) <= protocol.MAX_LINE_BYTES
    assert protocol.parse_event(line) == details
    assert max(p.iteration for p in details.history) >= 5990  # the whole run is still drawn, coarser


def test_a_mistyped_session_json_is_one_problem_line_and_the_rest_list(tmp_path):
    good, bad = _session(tmp_path, label="fine"), _session(tmp_path)
    bad.update_meta(label=["not", "a", "string"])
    listing = session_catalog.session_list(tmp_path)
    assert [s.id for s in listing.sessions] == [good.id]
    assert listing.problems == [f"{bad.id}: session.json: field 'label': input should be a valid string; skipped"]
    assert listing.folder == str(tmp_path)


def test_a_listed_session_deleted_since_says_its_folder_is_gone(tmp_path):
    gone = _session(tmp_path)
    shutil.rmtree(gone.folder)
    with pytest.raises(sessions.SessionGone) as raised:
        session_catalog.session_details(gone.id, tmp_path)
    assert str(raised.value) == f"{gone.folder}: the session folder is gone"

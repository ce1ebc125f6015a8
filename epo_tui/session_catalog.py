"""What a worker answers about the saved sessions on its own host: the `sessions` and `session` commands.

The sessions browser asks the worker, not the disk it runs on, so with `--worker "ssh host epo-tui
worker"` it lists and resumes the sessions of that host. Nothing here changes a session: it reads
the files and tests the runner's lock.
Plain Python; the messages are protocol.py's.
"""

from __future__ import annotations

import dataclasses
import math
import re
import socket
from pathlib import Path

from pydantic import ValidationError

from epo_tui import protocol, sessions
from epo_tui.pareto import ParetoFrontier
from epo_tui.protocol import FrontierPoint, SessionDetails, SessionInfo, SessionList, problem_text

HISTORY_POINTS = 1000  # frontier points sent for a session's chart, at most, and as many per-iteration bests
FULL_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")  # as sessions.new_session_id makes them
LINE_SHARE = 0.8  # of protocol.MAX_LINE_BYTES an answer may take; a longer history is sent coarser


def session_info(summary: sessions.SessionSummary) -> SessionInfo:
    """The summary as listed. ValidationError when session.json holds a field of the wrong type."""
    sae = summary.meta.get("sae")
    return SessionInfo(
        id=summary.id, status=summary.shown_status, features=summary.features, label=summary.label,
        model=summary.model, sae=summary.sae, hook=sae.get("hook") if isinstance(sae, dict) else None,
        iteration=summary.iteration, iterations_total=summary.iterations_total,
        checkpoint_iteration=summary.checkpoint_iteration, created=summary.created, updated=summary.updated,
        error=summary.error)


def session_list(root: Path | None = None) -> SessionList:
    """Every readable session, newest first; a damaged one is a line in `problems`. OSError when the
    sessions folder itself cannot be read."""
    summaries, problems = sessions.list_sessions(root)
    listed = []
    for summary in summaries:
        try:
            listed.append(session_info(summary))
        except ValidationError as err:
            problems.append(f"{summary.id}: {sessions.META_FILE}: {problem_text(err)}; skipped")
    return SessionList(host=socket.gethostname(), folder=str(sessions.sessions_dir(root)), sessions=listed,
                       problems=problems)


def session_details(query: str, root: Path | None = None) -> SessionDetails:
    """The session `query` names (an id or a unique prefix). UserError when none or several match;
    SessionError for a file that cannot be read (its elites included), SessionGone for a listed session
    deleted since (the browser asks by the full ids it listed)."""
    folder = sessions.sessions_dir(root) / query
    if FULL_ID.fullmatch(query) and not folder.is_dir():
        raise sessions.SessionGone(folder)
    session = sessions.find_session(query, root)
    meta = session.read_meta()
    try:
        info = session_info(sessions.summarize(session, meta))
    except ValidationError as err:
        raise sessions.SessionError(session.folder / sessions.META_FILE, problem_text(err)) from None
    elites = session.read_elites()
    lines, problems = session.read_history()
    points = []
    for data in lines:
        try:
            points.append(FrontierPoint.from_json(data))
        except ValidationError as err:
            problems.append(f"{sessions.HISTORY_FILE}: {problem_text(err)}; skipped")
    running_elsewhere = session.is_running_elsewhere()
    limit, budget = HISTORY_POINTS, LINE_SHARE * protocol.MAX_LINE_BYTES
    while True:
        details = SessionDetails(session=info, meta=meta, elites=elites, history=history_for_chart(points, limit),
                                 problems=problems, running_elsewhere=running_elsewhere)
        if limit <= 2 or len(protocol.encode(details)) <= budget:
            return details
        limit //= 2


def history_for_chart(points: list[FrontierPoint], max_points: int = HISTORY_POINTS) -> list[FrontierPoint]:
    """The history points a chart of it needs, in the order recorded: every point still on the (xent, act)
    frontier (thinned evenly past `max_points`), and each iteration's highest act (merged by max into at
    most `max_points` runs of iterations). A best that is not on the frontier loses its text and token
    ids: only its iteration and act are drawn."""
    frontier: ParetoFrontier[FrontierPoint] = ParetoFrontier(max_points)
    best_of: dict[int, FrontierPoint] = {}
    for point in points:
        frontier.add(point)
        if math.isfinite(point.act) and (point.iteration not in best_of or point.act > best_of[point.iteration].act):
            best_of[point.iteration] = point
    iterations = sorted(best_of)
    run = max(1, math.ceil(len(iterations) / max_points))
    bests = [max((best_of[i] for i in iterations[start:start + run]), key=lambda p: p.act)
             for start in range(0, len(iterations), run)]
    on_frontier = {id(p) for p in frontier.points}
    kept = frontier.points + [p if id(p) in on_frontier else dataclasses.replace(p, text="", token_ids=[])
                              for p in bests if id(p) not in on_frontier]
    return sorted(kept, key=lambda p: p.iteration)

"""A session as markdown (`epo-tui sessions show` / `export`): what was searched, where it got to, its elites
at the last checkpoint and its frontier so far, read from the session's files alone (no engine). Text is
escaped as in report.md."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from epo_tui import results, sessions
from epo_tui.pareto import ParetoFrontier
from epo_tui.protocol import FrontierPoint
from epo_tui.results import md_text


def export_markdown(session: sessions.Session) -> str:
    """A readable report of a session from its files alone (no engine): what was searched, where it
    got to, the elites at the last checkpoint and the frontier so far. Text is escaped as in report.md."""
    meta = session.read_meta()
    elites_file = session.read_elites_file()
    history, history_problems = session.read_history()
    sae = meta.get("sae") or {}
    lines = [f"# EPO session `{results.code_span(session.id)}`: {_features_title(meta.get('feature') or {})}", ""]
    if meta.get("label"):
        lines += [f"Label: {md_text(str(meta['label']))}", ""]
    lines += [f"Model `{results.code_span(meta.get('model', ''))}` · SAE `{results.code_span(sae.get('name', ''))}` "
              f"at `{results.code_span(sae.get('hook', ''))}`.", "",
              f"Status {md_text(str(meta.get('status')))}: iteration {meta.get('iteration')} of "
              f"{meta.get('iterations_total')}; created {_time_text(meta.get('created'))}, "
              f"updated {_time_text(meta.get('updated'))}.", ""]
    if meta.get("error"):
        lines += [f"Error: {md_text(str(meta['error']))}", ""]
    elites = elites_file["elites"]
    if elites:
        lines += [f"## Elites at iteration {elites_file['iteration']}", ""] + results.elites_table(elites)
        for k, elite in enumerate(elites, 1):
            lines += results.elite_section(k, elite)
    else:
        lines += ["No checkpoint saved yet: no elites to show."]
    lines += results.frontier_section(_frontier_of(history))
    if history_problems:
        lines += ["", f"({len(history_problems)} corrupt lines of {sessions.HISTORY_FILE} skipped.)"]
    return "\n".join(lines) + "\n"


def utc_text(when: datetime | str) -> str:
    """A time for people: `2026-11-25 10:30:00 UTC` (naive times are taken as UTC)."""
    when = datetime.fromisoformat(when) if isinstance(when, str) else when
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return f"{when.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def _time_text(value: Any) -> str:
    try:
        return utc_text(value)
    except (TypeError, ValueError):  # not a time we wrote
        return md_text(str(value))


def _features_title(feature: dict) -> str:
    try:
        return results.features_title(feature)
    except (KeyError, TypeError):  # an older or partial feature spec
        return md_text(f"features {feature.get('indices', '?')}")


def _frontier_of(points: list[dict]) -> list[dict]:
    """The history's points still on the (xent, act) frontier, lowest xent first (epo_tui.pareto: the
    chart's frontier); a line that is not a frontier point is left out."""
    frontier: ParetoFrontier[FrontierPoint] = ParetoFrontier()
    lines: dict[int, dict] = {}  # id of a point -> its line, as written
    for data in points:
        try:
            point = FrontierPoint.from_json(data)
        except ValidationError:
            continue
        lines[id(point)] = data
        frontier.add(point)
    return [lines[id(point)] for point in frontier.points]

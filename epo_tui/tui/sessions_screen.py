"""The sessions browser (`o`): every saved search, its details and best elites; reopen or resume one.

A modal screen over the app. It only reads the session folders (epo_tui.sessions): it never deletes or
rewrites anything, so nothing a user saved is lost by browsing. Reading happens off the event loop
(`asyncio.to_thread`), because a cache can hold hundreds of sessions and each status check touches a
lock file. Everything read from disk (labels, model names, token text) is shown inert and as plain
`rich.text.Text`, never as markup, so a token cannot inject escape sequences or Textual markup.

The screen dismisses with a `SessionChoice` (open the results, or resume the search) or None.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from epo_tui.protocol import Elite, FrontierPoint, problem_text
from epo_tui.sessions import HISTORY_FILE, SessionError, SessionSummary, list_sessions
from epo_tui.text import inert

BEST_ELITES_SHOWN = 5
ELITE_TEXT_CHARS = 160  # a longer prompt is cut in the details; `open` shows it whole
PROBLEMS_SHOWN = 3  # more damaged sessions than this are counted, not listed
EMPTY_TEXT = "no sessions yet (every search makes one)"
HELP_TEXT = "enter open · r resume · escape/q close"


@dataclass(frozen=True)
class SessionChoice:
    """What the user picked: `open` shows the saved results (elites and frontier history as read from
    disk); `resume` continues the search from its checkpoint (elites and frontier left empty: the
    worker's `started` event brings them)."""

    action: Literal["open", "resume"]
    session_id: str
    meta: dict[str, Any] = field(repr=False)
    elites: list[Elite] = field(default_factory=list, repr=False)
    frontier: list[FrontierPoint] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class SessionRow:
    """A listed session and the status to show for it (see `SessionSummary.shown_status`)."""

    summary: SessionSummary
    status: str


def is_resumable(summary: SessionSummary) -> bool:
    """A session can be resumed once it has a checkpoint, whatever its status (a finished one can run
    more iterations)."""
    return summary.checkpoint_iteration is not None


def load_session_rows(root: Path | None = None) -> tuple[list[SessionRow], list[str]]:
    """(rows newest first, problems). Blocking: touches every session folder; call it off the loop."""
    summaries, problems = list_sessions(root)
    return [SessionRow(s, s.shown_status) for s in summaries], problems


def best_elites(elites: list[Elite], count: int = BEST_ELITES_SHOWN) -> list[Elite]:
    """The `count` elites with the highest act (elites whose act is not finite go last)."""
    return sorted(elites, key=lambda e: e.act if math.isfinite(e.act) else -math.inf, reverse=True)[:count]


def _short_time(value: str) -> str:
    """`2026-11-25 10:30` in UTC, or the raw value (inert) if it is not a time we wrote."""
    try:
        when = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return inert(str(value))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return f"{when.astimezone(timezone.utc):%Y-%m-%d %H:%M}"


def _short_name(name: str, width: int = 24) -> str:
    """The last path part of a model/SAE name, cut to `width` with an ellipsis."""
    tail = inert(name).rstrip("/").rsplit("/", 1)[-1]
    return tail if len(tail) <= width else tail[:width - 1] + "…"


def _features_text(summary: SessionSummary) -> str:
    features = "+".join(map(str, summary.features)) or "?"
    return inert(f"{features} {summary.label}" if summary.label else features)


def _progress_text(summary: SessionSummary) -> str:
    # the checkpoint is where a resume starts, so it is the iteration that counts (as in the CLI)
    done = summary.checkpoint_iteration if summary.checkpoint_iteration is not None else summary.iteration
    return f"{done}/{summary.iterations_total}"


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


def details_text(row: SessionRow, elites: list[Elite] | None, elites_problem: str | None = None) -> Text:
    """The details of one session: what was searched, where it got to, and its best elites."""
    summary, meta = row.summary, row.summary.meta
    sae = meta.get("sae") if isinstance(meta.get("sae"), dict) else {}
    text = Text()
    text.append(inert(summary.id), style="bold")
    text.append(f"  {inert(row.status)}  iteration {_progress_text(summary)}\n")
    text.append(f"label: {inert(summary.label) if summary.label else '(none)'}\n")
    text.append(f"features: {'+'.join(map(str, summary.features)) or '?'}\n")
    text.append(f"model {inert(summary.model)} · SAE {inert(summary.sae)} at {inert(str(sae.get('hook', '?')))}\n")
    text.append(f"created {_short_time(summary.created)} · updated {_short_time(summary.updated)} UTC\n")
    if summary.error:
        text.append(f"error: {inert(str(summary.error))}\n", style="bold red")
    if elites_problem:
        text.append(f"elites: {inert(elites_problem)}\n", style="dim")
    elif elites is None:
        text.append("reading elites…\n", style="dim")
    elif not elites:
        text.append("no checkpoint saved yet: no elites\n", style="dim")
    else:
        text.append(f"best elites (of {len(elites)}):\n")
        for elite in best_elites(elites):
            text.append(f"  act {_number(elite.act)}  xent {_number(elite.xent)}  ")
            prompt = inert(elite.text)
            text.append((prompt if len(prompt) <= ELITE_TEXT_CHARS else prompt[:ELITE_TEXT_CHARS - 1] + "…") + "\n")
    text.rstrip()  # no blank last line under the details
    return text


def _read_for_open(summary: SessionSummary) -> tuple[dict[str, Any], list[Elite], list[FrontierPoint], list[str]]:
    """(fresh meta, elites, frontier history points, history problems). Blocking; raises SessionError,
    also for an elite that is not one (a damaged or hand-edited file)."""
    session = summary.session
    meta = session.read_meta()
    elites = session.read_elites()
    history, problems = session.read_history()
    points = []
    for data in history:
        try:
            points.append(FrontierPoint.from_json(data))
        except ValidationError as err:
            problems.append(f"{HISTORY_FILE}: {problem_text(err)}; skipped")
    return meta, elites, points, problems


def _read_for_resume(summary: SessionSummary) -> tuple[dict[str, Any], bool]:
    """(fresh meta, whether another process runs it). Blocking; raises SessionError."""
    session = summary.session
    return session.read_meta(), session.is_running_elsewhere()


class SessionsScreen(ModalScreen[SessionChoice | None]):
    """Lists the saved sessions; enter opens the highlighted one, r resumes it, escape/q closes."""

    DEFAULT_CSS = """
    SessionsScreen { align: center middle; }
    SessionsScreen > Vertical { width: 90%; height: 90%; border: round $primary; background: $surface; padding: 0 1; }
    SessionsScreen #sessions-table { height: 1fr; min-height: 5; }
    SessionsScreen #sessions-empty { height: auto; }
    SessionsScreen #sessions-problems { height: auto; max-height: 5; color: $text-muted; }
    SessionsScreen #sessions-details { height: auto; max-height: 50%; border-top: solid $primary; }
    SessionsScreen #sessions-help { height: 1; color: $text-muted; }
    """
    AUTO_FOCUS = "#sessions-table"
    BINDINGS = [
        # priority: the table's own enter would fire on a mouse click too; here only the key opens
        Binding("enter", "open", "Open", priority=True),
        Binding("r", "resume", "Resume"),
        Binding("escape", "close", "Close"),
        Binding("q", "close", "Close", show=False),
    ]

    def __init__(self, root: Path | None = None) -> None:
        """`root`: the sessions folder (default: the cache's, as `epo_tui.sessions` has it)."""
        super().__init__()
        self.root = root
        self.rows: dict[str, SessionRow] = {}
        self.problems: list[str] = []
        self.loaded = False  # the list has been read (tests and the app can wait on it)
        self._elites: dict[str, list[Elite] | str] = {}  # id -> elites, or why they could not be read
        self._busy = False  # an open/resume is reading: a second key press must not dismiss twice

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("sessions", id="sessions-title")
            table: DataTable = DataTable(id="sessions-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("id", "status", "feature · label", "iteration", "updated (UTC)", "model · SAE")
            yield table
            yield Static("reading sessions…", id="sessions-empty")
            yield Static("", id="sessions-problems")
            yield Static("", id="sessions-details")
            yield Static(HELP_TEXT, id="sessions-help")

    def on_mount(self) -> None:
        self.query_one("#sessions-problems").display = False
        self.load_rows()

    # -- reading --------------------------------------------------------------------------------

    @work(exclusive=True, group="sessions-list")
    async def load_rows(self) -> None:
        try:
            rows, problems = await asyncio.to_thread(load_session_rows, self.root)
        except OSError as err:  # the sessions folder itself is unreadable: say so, list nothing
            rows, problems = [], [f"cannot read the sessions folder: {err.strerror or err}"]
        self.show_rows(rows, problems)

    def show_rows(self, rows: list[SessionRow], problems: list[str]) -> None:
        self.rows = {row.summary.id: row for row in rows}
        self.problems = problems
        self.query_one("#sessions-title", Static).update(f"sessions: {len(rows)}, newest first")
        table = self.query_one("#sessions-table", DataTable)
        table.clear()
        for row in rows:
            s = row.summary
            table.add_row(inert(s.id.rsplit("-", 1)[-1]), inert(row.status), Text(_features_text(s)),
                          _progress_text(s), _short_time(s.updated),
                          Text(f"{_short_name(s.model, 16)} · {_short_name(s.sae)}"), key=s.id)
        empty = self.query_one("#sessions-empty", Static)
        empty.update(EMPTY_TEXT)
        empty.display = not rows
        table.display = bool(rows)
        problem_lines = [f"skipped a damaged session: {inert(p)}" for p in problems[:PROBLEMS_SHOWN]]
        if len(problems) > PROBLEMS_SHOWN:
            problem_lines.append(f"… and {len(problems) - PROBLEMS_SHOWN} more damaged sessions")
        problems_widget = self.query_one("#sessions-problems", Static)
        problems_widget.update(Text("\n".join(problem_lines)))
        problems_widget.display = bool(problems)
        self.loaded = True
        if rows:
            table.move_cursor(row=0)
            self.show_details(rows[0].summary.id)
        else:
            self.query_one("#sessions-details", Static).update("")

    @on(DataTable.RowHighlighted, "#sessions-table")
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.show_details(event.row_key.value)

    def show_details(self, session_id: str) -> None:
        row = self.rows.get(session_id)
        if row is None:
            return
        known = self._elites.get(session_id)
        details = self.query_one("#sessions-details", Static)
        if isinstance(known, str):
            details.update(details_text(row, None, known))
        else:
            details.update(details_text(row, known))
            if known is None:
                self.read_elites(session_id)

    @work(exclusive=True, group="sessions-details")
    async def read_elites(self, session_id: str) -> None:
        """Reads one session's elites (exclusive: moving on past a row cancels its read)."""
        row = self.rows[session_id]
        try:
            self._elites[session_id] = await asyncio.to_thread(row.summary.session.read_elites)
        except SessionError as err:
            self._elites[session_id] = f"{err.path.name}: {err.reason}"
        if self.highlighted_id() == session_id:
            self.show_details(session_id)

    def highlighted_id(self) -> str | None:
        tables = self.query("#sessions-table").results(DataTable)
        table = next(tables, None)  # none once the screen is closing: a late read then shows nothing
        if table is None or not self.rows or table.row_count == 0:
            return None
        key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return key.value

    # -- actions --------------------------------------------------------------------------------

    def action_close(self) -> None:
        self.dismiss(None)

    def action_open(self) -> None:
        session_id = self.highlighted_id()
        if session_id is not None and not self._busy:
            self._busy = True
            self.choose_open(self.rows[session_id].summary)

    def action_resume(self) -> None:
        session_id = self.highlighted_id()
        if session_id is None or self._busy:
            return
        summary = self.rows[session_id].summary
        if not is_resumable(summary):
            self.notify(f"session {summary.id} has no checkpoint yet: nothing to resume from (enter opens it)",
                        severity="warning")
            return
        self._busy = True
        self.choose_resume(summary)

    @work(exclusive=True, group="sessions-choose")
    async def choose_open(self, summary: SessionSummary) -> None:
        try:
            meta, elites, frontier, problems = await asyncio.to_thread(_read_for_open, summary)
        except SessionError as err:
            self._busy = False
            self.notify(inert(str(err)), title=f"cannot open session {summary.id}", severity="error")
            return
        if problems:
            self.notify(f"{len(problems)} damaged lines of its history skipped", title=f"session {summary.id}",
                        severity="warning")
        self.dismiss(SessionChoice("open", summary.id, meta, elites, frontier))

    @work(exclusive=True, group="sessions-choose")
    async def choose_resume(self, summary: SessionSummary) -> None:
        try:
            meta, running_elsewhere = await asyncio.to_thread(_read_for_resume, summary)
        except SessionError as err:
            self._busy = False
            self.notify(inert(str(err)), title=f"cannot resume session {summary.id}", severity="error")
            return
        if running_elsewhere:
            self._busy = False
            self.notify(f"session {summary.id} is being run by another process; open it (enter) to see "
                        "its last checkpoint", title="cannot resume", severity="warning")
            return
        self.dismiss(SessionChoice("resume", summary.id, meta))

"""The sessions browser (`o`): every saved search, its details and best elites; reopen or resume one.

A modal screen over the app. The sessions are the worker's: the screen asks its `SessionSource` (the
worker client: the `sessions` and `session` commands), so with `--worker "ssh host epo-tui worker"` it
lists and resumes that host's sessions. It never deletes or rewrites anything, so nothing a user saved is
lost by browsing. Everything a session holds (labels, model names, token text) is shown inert and as
plain `rich.text.Text`, never as markup, so a token cannot inject escape sequences or Textual markup.

The screen dismisses with a `SessionChoice` (open the results, or resume the search) or None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from epo_tui.client import WorkerError
from epo_tui.protocol import Elite, FrontierPoint, SessionDetails, SessionInfo, SessionList
from epo_tui.text import inert

BEST_ELITES_SHOWN = 5
ELITE_TEXT_CHARS = 160  # a longer prompt is cut in the details; `open` shows it whole
PROBLEMS_SHOWN = 3  # more damaged sessions than this are counted, not listed
EMPTY_TEXT = "no sessions yet (every search makes one)"
HELP_TEXT = "enter open · r resume · escape/q close"


class SessionSource(Protocol):
    """Where the saved sessions come from: the worker client (client.WorkerClient). Both raise
    WorkerError: the worker's error (no such session, a damaged file), no answer, or no worker."""

    async def sessions(self) -> SessionList: ...

    async def session(self, session_id: str) -> SessionDetails: ...


@dataclass(frozen=True)
class SessionChoice:
    """What the user picked: `open` shows the saved results (elites and the frontier history as the
    worker read them); `resume` continues the search from its checkpoint (elites and history left empty:
    the worker's `started` event brings them)."""

    action: Literal["open", "resume"]
    session: SessionInfo
    meta: dict[str, Any] = field(repr=False)
    elites: list[Elite] = field(default_factory=list, repr=False)
    history: list[FrontierPoint] = field(default_factory=list, repr=False)

    @property
    def session_id(self) -> str:
        return self.session.id


def is_resumable(info: SessionInfo) -> bool:
    """A session can be resumed once it has a checkpoint, whatever its status (a finished one can run
    more iterations)."""
    return info.checkpoint_iteration is not None


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


def _features_text(info: SessionInfo) -> str:
    features = "+".join(map(str, info.features)) or "?"
    return inert(f"{features} {info.label}" if info.label else features)


def _progress_text(info: SessionInfo) -> str:
    # the checkpoint is where a resume starts, so it is the iteration that counts (as in the CLI)
    done = info.checkpoint_iteration if info.checkpoint_iteration is not None else info.iteration
    return f"{done}/{info.iterations_total}"


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


def details_text(info: SessionInfo, elites: list[Elite] | None, elites_problem: str | None = None) -> Text:
    """The details of one session: what was searched, where it got to, and its best elites."""
    text = Text()
    text.append(inert(info.id), style="bold")
    text.append(f"  {inert(info.status)}  iteration {_progress_text(info)}\n")
    text.append(f"label: {inert(info.label) if info.label else '(none)'}\n")
    text.append(f"features: {'+'.join(map(str, info.features)) or '?'}\n")
    text.append(f"model {inert(info.model)} · SAE {inert(info.sae)} at {inert(info.hook or '?')}\n")
    text.append(f"created {_short_time(info.created)} · updated {_short_time(info.updated)} UTC\n")
    if info.error:
        text.append(f"error: {inert(info.error)}\n", style="bold red")
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


class SessionsScreen(ModalScreen[SessionChoice | None]):
    """Lists the worker's saved sessions; enter opens the highlighted one, r resumes it, escape/q closes."""

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
        Binding("enter", "open", "Open", priority=True, id="sessions.open"),
        Binding("r", "resume", "Resume", id="sessions.resume"),
        Binding("escape", "close", "Close", id="sessions.close"),
        Binding("q", "close", "Close", show=False, id="sessions.close"),
    ]

    def __init__(self, source: SessionSource) -> None:
        """`source`: where the sessions come from (the app's worker client)."""
        super().__init__()
        self.source = source
        self.rows: dict[str, SessionInfo] = {}
        self.problems: list[str] = []
        self.host: str | None = None  # the worker's host, as its listing names it
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
            listing = await self.source.sessions()
        except WorkerError as err:  # no worker, or it cannot read its sessions folder: say so, list nothing
            self.show_rows([], [], failure=f"cannot list the sessions: {err.message}")
            return
        self.host = listing.host
        self.show_rows(listing.sessions, listing.problems)

    def show_rows(self, rows: list[SessionInfo], problems: list[str], failure: str | None = None) -> None:
        self.rows = {info.id: info for info in rows}
        self.problems = problems
        where = f" on {inert(self.host)}" if self.host else ""
        self.query_one("#sessions-title", Static).update(Text(f"sessions{where}: {len(rows)}, newest first"))
        table = self.query_one("#sessions-table", DataTable)
        table.clear()
        for info in rows:
            table.add_row(inert(info.id.rsplit("-", 1)[-1]), inert(info.status), Text(_features_text(info)),
                          _progress_text(info), _short_time(info.updated),
                          Text(f"{_short_name(info.model, 16)} · {_short_name(info.sae)}"), key=info.id)
        empty = self.query_one("#sessions-empty", Static)
        empty.update(EMPTY_TEXT)
        empty.display = not rows
        table.display = bool(rows)
        problem_lines = [f"skipped a damaged session: {inert(p)}" for p in problems[:PROBLEMS_SHOWN]]
        if len(problems) > PROBLEMS_SHOWN:
            problem_lines.append(f"… and {len(problems) - PROBLEMS_SHOWN} more damaged sessions")
        if failure:
            problem_lines = [inert(failure)]
        problems_widget = self.query_one("#sessions-problems", Static)
        problems_widget.update(Text("\n".join(problem_lines)))
        problems_widget.display = bool(problem_lines)
        self.loaded = True
        if rows:
            table.move_cursor(row=0)
            self.show_details(rows[0].id)
        else:
            self.query_one("#sessions-details", Static).update("")

    @on(DataTable.RowHighlighted, "#sessions-table")
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.show_details(event.row_key.value)

    def show_details(self, session_id: str) -> None:
        info = self.rows.get(session_id)
        if info is None:
            return
        known = self._elites.get(session_id)
        details = self.query_one("#sessions-details", Static)
        if isinstance(known, str):
            details.update(details_text(info, None, known))
        else:
            details.update(details_text(info, known))
            if known is None:
                self.read_elites(session_id)

    @work(exclusive=True, group="sessions-details")
    async def read_elites(self, session_id: str) -> None:
        """Asks for one session's elites (exclusive: moving on past a row cancels its wait)."""
        try:
            self._elites[session_id] = (await self.source.session(session_id)).elites
        except WorkerError as err:
            self._elites[session_id] = err.message
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
            self.choose_open(session_id)

    def action_resume(self) -> None:
        session_id = self.highlighted_id()
        if session_id is None or self._busy:
            return
        if not is_resumable(self.rows[session_id]):
            self.notify(f"session {session_id} has no checkpoint yet: nothing to resume from (enter opens it)",
                        severity="warning")
            return
        self._busy = True
        self.choose_resume(session_id)

    async def _details(self, session_id: str, doing: str) -> SessionDetails | None:
        """The session as the worker reads it now; None (and said) when it cannot."""
        try:
            return await self.source.session(session_id)
        except WorkerError as err:
            self._busy = False
            self.notify(inert(err.message), title=f"cannot {doing} session {session_id}", severity="error")
            return None

    @work(exclusive=True, group="sessions-choose")
    async def choose_open(self, session_id: str) -> None:
        details = await self._details(session_id, "open")
        if details is None:
            return
        if details.problems:
            self.notify(f"{len(details.problems)} damaged lines of its history skipped",
                        title=f"session {session_id}", severity="warning")
        self.dismiss(SessionChoice("open", details.session, details.meta, details.elites, details.history))

    @work(exclusive=True, group="sessions-choose")
    async def choose_resume(self, session_id: str) -> None:
        details = await self._details(session_id, "resume")
        if details is None:
            return
        if details.running_elsewhere:
            self._busy = False
            self.notify(f"session {session_id} is being run by another process; open it (enter) to see "
                        "its last checkpoint", title="cannot resume", severity="warning")
            return
        self.dismiss(SessionChoice("resume", details.session, details.meta))

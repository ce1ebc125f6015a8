"""The worker protocol: newline-delimited JSON over the worker's stdin (commands) and stdout (events).

Every message is one JSON object on one line with the protocol version `v` and a `type`. A command may
carry an `id` (any JSON string or integer); the events that answer it echo that `id`. Plain Python,
shared by the worker (engine side) and the client (UI side). The full description, with examples, is
in PROTOCOL.md next to this file.

Each command and each event is a frozen dataclass here, checked field by field by pydantic in strict
mode (no "1" read as 1, no 1 read as true) whether it is built in Python or read from a line. `encode`
writes any of them as a line; `parse_command` and `parse_event` read one back, and turn anything
malformed into one `ProtocolError` line. Commands refuse unknown fields; events ignore them, so a
client reads a newer worker that added a field.
"""

from __future__ import annotations

import json
from dataclasses import field
from functools import cache
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from epo_tui.features import FeatureEntry

VERSION = 1
MAX_LINE_BYTES = 1 << 20  # a longer line is refused (and skipped), never buffered without bound

# a bad line, a bad config, a refused command, a session file not written (disk full, folder deleted), a bug
ERROR_KINDS = ("protocol", "config", "input", "session", "internal")
# kinds the client (client.py) gives errors of its own: the worker's end, no answer in time, a command
# sent to no worker
CLIENT_ERROR_KINDS = ("worker_died", "worker_exited", "timeout", "not_running")
STATES = Literal["idle", "loading", "compiling", "running", "paused", "stopping"]
Id = str | int | None

# The decorators of every command, and of every event and record: an event's unknown fields (from a
# newer worker) are skipped, a command's refused.
_command = dataclass(frozen=True, kw_only=True, config=ConfigDict(strict=True, extra="forbid"))
_event = dataclass(frozen=True, kw_only=True, config=ConfigDict(strict=True, extra="ignore"))


class ProtocolError(ValueError):
    """A line that is not a valid message; `id` is the command's id when it could be read."""

    def __init__(self, message: str, id: Any = None):
        super().__init__(message)
        self.id = id


# ------------------------------------------------------------------------------------------ commands


@_command
class Command:
    """A command, client -> worker; `TYPE` is its `type` on the wire."""

    TYPE: ClassVar[str] = ""
    id: Id = None


@_command
class HelloCommand(Command):
    TYPE: ClassVar[str] = "hello"
    client: str | None = None


@_command
class LoadCommand(Command):
    """One of: `config` (the config's sections), `config_path` (a file on the worker's host), `demo`."""

    TYPE: ClassVar[str] = "load"
    config: dict[str, Any] | None = None
    config_path: str | None = None
    demo: bool = False


@_command
class FeaturesCommand(Command):
    TYPE: ClassVar[str] = "features"


@_command
class StartCommand(Command):
    """A new search (`feature`, `search`: keys of those config sections to override) or, with `resume`
    (a session id or unique prefix), a stopped one; `checkpoint_seconds` in 0..30."""

    TYPE: ClassVar[str] = "start"
    feature: dict[str, Any] | None = None
    search: dict[str, Any] | None = None
    seed_prompt: str | None = None
    resume: str | None = None
    checkpoint_seconds: float | None = None


@_command
class PauseCommand(Command):
    TYPE: ClassVar[str] = "pause"


@_command
class ResumeCommand(Command):
    """Without `session`, the paused search goes on. With `session` (a saved session's id or unique
    prefix, as `sessions` lists them), that session continues from its checkpoint, as `start` with
    `resume` does; `iterations` is its new total (default: the total it had)."""

    TYPE: ClassVar[str] = "resume"
    session: str | None = None
    iterations: int | None = None


@_command
class StopCommand(Command):
    TYPE: ClassVar[str] = "stop"


@_command
class ScoreCommand(Command):
    """`top_features` > 0 also asks for the latents that fire most on the text (that many at most)."""

    TYPE: ClassVar[str] = "score"
    text: str
    feature: int | None = None
    top_features: int | None = None


@_command
class InjectCommand(Command):
    TYPE: ClassVar[str] = "inject"
    text: str


@_command
class ShutdownCommand(Command):
    TYPE: ClassVar[str] = "shutdown"


@_command
class SessionsCommand(Command):
    """The saved sessions on the worker's host, answered with `session_list`."""

    TYPE: ClassVar[str] = "sessions"


@_command
class SessionCommand(Command):
    """One saved session (`session`: its id or a unique prefix), answered with `session_details`."""

    TYPE: ClassVar[str] = "session"
    session: str


COMMANDS: dict[str, type[Command]] = {c.TYPE: c for c in (
    HelloCommand, LoadCommand, FeaturesCommand, StartCommand, PauseCommand, ResumeCommand, StopCommand,
    ScoreCommand, InjectCommand, ShutdownCommand, SessionsCommand, SessionCommand)}


# ------------------------------------------------------------------------------------ shared records


class _Record:
    """A record that events carry and files keep: to and from its JSON object."""

    def to_json(self) -> dict[str, Any]:
        return _dump(type(self), self)

    @classmethod
    def from_json(cls, data: Any) -> Any:
        """The record from a JSON object (a file's, an event's); pydantic's ValidationError when malformed
        (a missing or mistyped field)."""
        return _adapter(cls).validate_json(json.dumps(data))


@_event
class Elite(_Record):
    """One elite prompt as reported: `tokens`, `token_bytes` (each token's raw bytes in hex) and
    `activations` cover BOS and the prefix too; the optimized prompt starts at `prompt_start`. `act`
    and `activations` are the feature's activation, `xent` the prompt's cross-entropy in nats per
    token, `objective` = act - penalty * xent. `feature_activations` (feature index as a string -> one
    activation per position) only when several features are combined."""

    penalty: float
    token_ids: list[int]
    tokens: list[str]
    token_bytes: list[str] = field(default_factory=list)  # empty in files written before it existed
    activations: list[float]
    act: float
    xent: float
    objective: float
    prompt_start: int = 0
    text: str
    feature_activations: dict[str, list[float]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The elite as a JSON object (result.json, a session's elites.json); no null fields."""
        data = super().to_json()
        if data["feature_activations"] is None:
            del data["feature_activations"]
        return data


@_event
class OptimizedFeature(_Record):
    """What a search maximizes, as it resolved the config's `[feature]`: the SAE latents `indices` (of
    `kind`), combined by `combine` (`lp_p`, `lp_offset` for the Lp combination) and read at the `read`
    position of `hook`, the hook point the target reads."""

    kind: str
    indices: list[int]
    combine: str
    lp_p: float
    lp_offset: float
    read: str
    hook: str


@_event
class FrontierPoint(_Record):
    """A prompt that entered the (xent, act) Pareto frontier at `iteration`."""

    iteration: int
    xent: float
    objective: float
    act: float
    token_ids: list[int]
    text: str


@_event
class SessionInfo(_Record):
    """One saved session as listed. `status` as it should be shown: a session marked running or paused
    whose runner is gone (killed, a crash) is "interrupted". `checkpoint_iteration` is where a resume
    starts (None: no checkpoint yet, nothing to resume); `created`, `updated` are ISO 8601 times in UTC."""

    id: str
    status: str
    features: list[int]
    label: str | None = None
    model: str
    sae: str
    hook: str | None = None
    iteration: int
    iterations_total: int
    checkpoint_iteration: int | None = None
    created: str
    updated: str
    error: str | None = None


# -------------------------------------------------------------------------------------------- events


@_event
class Event:
    """An event, worker -> client (or published by the client itself); `TYPE` is its `type` on the wire."""

    TYPE: ClassVar[str] = ""
    id: Id = None


@_event
class Hello(Event):
    TYPE: ClassVar[str] = "hello"
    worker: str
    protocol: int
    pid: int


@_event
class State(Event):
    TYPE: ClassVar[str] = "state"
    state: STATES
    detail: str | None = None


@_event
class Ready(Event):
    """The model and SAE are loaded. `neuronpedia_id` is the SAE's "<modelId>/<layer>" (None when its
    metadata has none, or from a worker older than the field); `dtype` as loaded ("auto" resolved);
    `model_parallel` devices split each layer's weights."""

    TYPE: ClassVar[str] = "ready"
    model: str
    sae: str
    hook: str
    d_sae: int
    neuronpedia_id: str | None = None
    dtype: str
    devices: list[str]
    device_kind: str
    model_parallel: int = 1
    config: dict[str, Any]
    labels: str | None = None


@_event
class FeatureList(Event):
    TYPE: ClassVar[str] = "features"
    features: list[FeatureEntry]


@_event
class Started(Event):
    """A search started (or resumed at `iteration`); `feature` says what is optimized (an
    `OptimizedFeature`'s JSON object). `label` names the features for a status line ("feature 48");
    `feature_label` is their interpretation as the session keeps it ("Debian", from the worker's labels;
    "A + B" when combined), null when unlabelled. `penalty_scale` says what λ means in this search
    (engine/penalty_scale.py's description), null from an older worker."""

    TYPE: ClassVar[str] = "started"
    session: str
    label: str | None = None
    feature_label: str | None = None
    feature: dict[str, Any] = field(default_factory=dict)
    iteration: int
    iterations_total: int
    lambdas: list[float]
    elites: list[Elite]
    penalty_scale: str | None = None


@_event
class Progress(Event):
    """One iteration done: a snapshot, except `frontier_new` (only this iteration's new points).
    `it_per_s` over the last 10 iterations; `budget_left_s` of `search.time_budget`, paused time not
    counted (None without a budget)."""

    TYPE: ClassVar[str] = "progress"
    session: str
    iteration: int
    iterations_total: int
    it_per_s: float | None = None
    budget_left_s: float | None = None
    elites: list[Elite]
    frontier_new: list[FrontierPoint] = field(default_factory=list)
    best_objective: float | None = None


@_event
class Checkpointed(Event):
    TYPE: ClassVar[str] = "checkpointed"
    session: str
    iteration: int


@_event
class Finished(Event):
    """A search ended; `folder` holds result.json and report.md; `reason` says why when it was not
    asked to stop (a time budget ran out)."""

    TYPE: ClassVar[str] = "finished"
    session: str
    status: Literal["finished", "stopped", "crashed"]
    iteration: int
    iterations_total: int
    folder: str
    reason: str | None = None


@_event
class TopFeature(_Record):
    """A latent firing on a scored text: its strongest activation `act` there, at token `position`
    (counting BOS and prefix, as `Scored.tokens` does)."""

    index: int
    act: float
    position: int


@_event
class Scored(Event):
    """A text scored (`epo-tui score --json`), BOS and prefix included: positions from `prompt_start` on
    are the text's. `xent[i]` = -log p(token i | tokens before it) in nats, None for the first token."""

    TYPE: ClassVar[str] = "scored"
    feature: int
    tokens: list[str]
    token_bytes: list[str]
    token_ids: list[int]
    activations: list[float]
    xent: list[float | None]
    prompt_start: int
    top_features: list[TopFeature] = field(default_factory=list)  # strongest first; asked for with the command's top_features


@_event
class Injected(Event):
    TYPE: ClassVar[str] = "injected"
    elite: int  # the index it replaced
    act: float
    xent: float
    text: str


@_event
class Error(Event):
    """`kind`: one of ERROR_KINDS from the worker, CLIENT_ERROR_KINDS from the client. The client's own
    errors add `origin` "client" and an `excerpt` of an unreadable line, or, for a dead worker, its
    `returncode` and the last lines of its stderr."""

    TYPE: ClassVar[str] = "error"
    kind: str
    message: str
    traceback: str | None = None
    origin: str | None = None
    excerpt: str | None = None
    stderr_tail: list[str] = field(default_factory=list)
    returncode: int | None = None


@_event
class Log(Event):
    TYPE: ClassVar[str] = "log"
    level: str
    message: str


@_event
class Bye(Event):
    TYPE: ClassVar[str] = "bye"
    reason: str | None = None


@_event
class SessionList(Event):
    """The saved sessions in the worker's `folder` on `host`, newest first; `problems`: one line per
    session folder that could not be read (skipped)."""

    TYPE: ClassVar[str] = "session_list"
    host: str
    folder: str
    sessions: list[SessionInfo]
    problems: list[str] = field(default_factory=list)


@_event
class SessionDetails(Event):
    """One saved session: its session.json (`meta`), the elites of its checkpoint (none before the first),
    and its frontier history reduced to what a chart draws (every point still on the (xent, act)
    frontier, and each iteration's highest act), bounded so the line stays short. `problems`: history
    lines skipped as damaged; `running_elsewhere`: another process runs it (it cannot be resumed now)."""

    TYPE: ClassVar[str] = "session_details"
    session: SessionInfo
    meta: dict[str, Any]
    elites: list[Elite]
    history: list[FrontierPoint]
    problems: list[str] = field(default_factory=list)
    running_elsewhere: bool = False


@_event
class WorkerStarted(Event):
    """Published by the client when it starts a worker process (never on the wire)."""

    TYPE: ClassVar[str] = "worker_started"
    pid: int
    command: list[str]


@_event
class WorkerExited(Event):
    """Published by the client when the worker ended after `bye` or the client's own close()."""

    TYPE: ClassVar[str] = "worker_exited"
    returncode: int | None = None
    message: str


EVENTS: dict[str, type[Event]] = {e.TYPE: e for e in (
    Hello, State, Ready, FeatureList, Started, Progress, Checkpointed, Finished, Scored, Injected, Error,
    Log, Bye, SessionList, SessionDetails)}


# ------------------------------------------------------------------------------------ (de)serialising


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _dump(cls: type, message: Any) -> dict[str, Any]:
    return _adapter(cls).dump_python(message, mode="json")


def to_json(message: Command | Event) -> dict[str, Any]:
    """The message as its JSON object, `type` first (without the version). An `id` of None is left out,
    and so is a command's field left at None: a worker of an earlier release refuses a null there."""
    data = _dump(type(message), message)
    leave_out = {k for k, v in data.items() if v is None and (k == "id" or isinstance(message, Command))}
    return {"type": message.TYPE, **{k: v for k, v in data.items() if k not in leave_out}}


def encode(message: Command | Event) -> bytes:
    """One line of JSON (no raw newlines inside: json escapes them), the version first. ValueError for a
    NaN or an infinity: JSON has none."""
    return (json.dumps({"v": VERSION, **to_json(message)}, ensure_ascii=False, allow_nan=False,
                       separators=(",", ":")) + "\n").encode("utf-8")


def _object(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"line of {len(line):,} bytes is longer than {MAX_LINE_BYTES:,}")
    try:
        message = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ProtocolError(f"line is not UTF-8 (byte {err.start})") from None
    except ValueError as err:
        raise ProtocolError(f"line is not JSON: {err}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"expected a JSON object, found {type(message).__name__}")
    return message


def problem_text(err: ValidationError) -> str:
    """A message's (or record's) first problem as a few words, naming its field: "missing field 'text'"."""
    problem = err.errors()[0]
    where = ".".join(str(part) for part in problem["loc"]) or "the message"
    if problem["type"] == "missing":
        return f"missing field {where!r}"
    if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown field {where!r}"
    return f"field {where!r}: {problem['msg'][0].lower()}{problem['msg'][1:]}"


def parse_command(line: bytes) -> Command:
    """A command from one line; ProtocolError (with the id when readable) for anything else."""
    message = _object(line)
    id_ = message.get("id")
    if id_ is not None and (not isinstance(id_, (str, int)) or isinstance(id_, bool)):
        raise ProtocolError("'id' must be a string or an integer")
    if message.get("v") != VERSION:
        raise ProtocolError(f"protocol version {message.get('v')!r} is not supported (this worker speaks "
                            f"{VERSION})", id_)
    type_ = message.get("type")
    if type_ not in COMMANDS:
        raise ProtocolError(f"unknown command {type_!r} (commands: {', '.join(COMMANDS)})", id_)
    try:
        fields = {k: v for k, v in message.items() if k not in ("v", "type")}
        # strict JSON mode reads an object as the dataclass (strict Python mode takes only an instance)
        return _adapter(COMMANDS[type_]).validate_json(json.dumps(fields))
    except ValidationError as err:
        raise ProtocolError(f"{type_}: {problem_text(err)}", id_) from None


def parse_event(line: bytes) -> Event:
    """An event from one line (the client's side); ProtocolError for an unknown or malformed one."""
    message = _object(line)
    if message.get("v") != VERSION:
        raise ProtocolError(f"the worker speaks protocol version {message.get('v')!r}, this client {VERSION}")
    type_ = message.get("type")
    if type_ not in EVENTS:
        raise ProtocolError(f"unknown event {type_!r}")
    try:  # the line itself: an event skips unknown fields, `v` and `type` among them
        return _adapter(EVENTS[type_]).validate_json(line)
    except ValidationError as err:
        raise ProtocolError(f"{type_}: {problem_text(err)}") from None


"""The worker protocol: newline-delimited JSON over the worker's stdin (commands) and stdout (events).

Every message is one JSON object on one line with the protocol version `v` and a `type`. A command may
carry an `id` (any JSON string or integer); the events that answer it echo that `id`. Plain Python,
shared by the worker (engine side) and the client (UI side). The full description, with examples, is
in PROTOCOL.md next to this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERSION = 1
MAX_LINE_BYTES = 1 << 20  # a longer line is refused (and skipped), never buffered without bound

# command type -> {field: (allowed JSON types, required)}
COMMANDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {"client": ((str,), False)},
    "load": {"config": ((dict,), False), "config_path": ((str,), False), "demo": ((bool,), False)},
    "features": {},
    "start": {"feature": ((dict,), False), "search": ((dict,), False), "seed_prompt": ((str,), False),
              "resume": ((str,), False), "checkpoint_seconds": ((int, float), False)},
    "pause": {},
    "resume": {},
    "stop": {},
    "score": {"text": ((str,), True), "feature": ((int,), False)},
    "inject": {"text": ((str,), True)},
    "shutdown": {},
}

EVENTS = ("hello", "ready", "state", "features", "started", "progress", "checkpointed", "finished", "scored",
          "injected", "error", "log", "bye")
# a bad line, a bad config, a refused command, a session file not written (disk full, folder deleted), a bug
ERROR_KINDS = ("protocol", "config", "input", "session", "internal")


class ProtocolError(ValueError):
    """A line that is not a valid command; `id` is the command's id when it could be read."""

    def __init__(self, message: str, id: Any = None):
        super().__init__(message)
        self.id = id


@dataclass(frozen=True)
class Command:
    type: str
    fields: dict[str, Any]
    id: Any = None

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def encode(message: dict[str, Any]) -> bytes:
    """One line of JSON (no raw newlines inside: json escapes them), the version first."""
    return (json.dumps({"v": VERSION, **message}, ensure_ascii=False, allow_nan=False,
                       separators=(",", ":")) + "\n").encode("utf-8")


def command(type_: str, id: Any = None, **fields: Any) -> bytes:
    """A command line, as a client sends it."""
    return encode({"type": type_, **({"id": id} if id is not None else {}), **fields})


def event(type_: str, id: Any = None, **fields: Any) -> bytes:
    """An event line, as the worker sends it."""
    return encode({"type": type_, **({"id": id} if id is not None else {}), **fields})


def error_event(kind: str, message: str, id: Any = None, traceback: str | None = None) -> bytes:
    return event("error", id=id, kind=kind, message=message, traceback=traceback)


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
    spec = COMMANDS[type_]
    fields = {k: v for k, v in message.items() if k not in ("v", "type", "id")}
    for name in fields:
        if name not in spec:
            raise ProtocolError(f"{type_}: unknown field {name!r}", id_)
    for name, (types, required) in spec.items():
        if name not in fields:
            if required:
                raise ProtocolError(f"{type_}: missing field {name!r}", id_)
            continue
        value = fields[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ProtocolError(f"{type_}: field {name!r} must be {names}", id_)
    return Command(type=type_, fields=fields, id=id_)


def parse_event(line: bytes) -> dict[str, Any]:
    """An event from one line (the client's side): a dict with a known `type`."""
    message = _object(line)
    if message.get("v") != VERSION:
        raise ProtocolError(f"the worker speaks protocol version {message.get('v')!r}, this client {VERSION}")
    if message.get("type") not in EVENTS:
        raise ProtocolError(f"unknown event {message.get('type')!r}")
    return message

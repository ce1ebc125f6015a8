"""A stand-in worker for tests/test_client.py: speaks the protocol, runs no engine, starts in a blink.

Usage: python tests/fake_worker.py MODE [ARG] [--record FILE]

Modes (each starts with the worker's unsolicited `hello`):
  echo              answers hello, load, features, start, pause, resume, stop, score, inject, shutdown by id;
                    `score` with text "__die__" exits with code 5 instead (a crash on demand), with a
                    negative feature answers an `error` of kind input
  flood N           started, N progress events as fast as possible (a log every N/10, a frontier point
                    every 100), finished, bye
  die-after K       waits for one command, emits K log events, writes 30 lines to stderr, exits with 3
  sigkill-self      waits for one command, then SIGKILLs itself
  garbage           non-JSON, non-UTF-8, non-object, unknown-type, wrong-version, mistyped and over-long lines
                    among valid ones, then a log "after garbage" and bye
  sleep             reads commands and never answers; exits at end of input
  hang-on-shutdown  ignores commands, end of input, SIGTERM and SIGHUP (only SIGKILL ends it)
  ui [finish|die]   for the UI's snapshots: a demo-like model with 40 labelled features (its SAE's
                    Neuronpedia id "demo/2-res", or $FAKE_NEURONPEDIA_ID; set empty: none); `start` (and
                    `resume` of a saved session) emits started and 5 progress events with fixed elites and
                    frontier points, then (finish) finished, or (die) 3 stderr lines and exit 3; without an
                    argument the search stays running; answers pause, resume, stop, score, inject and
                    shutdown, and `sessions`/`session` as the real worker does (from the real folder)
  ui-evil [finish|die]  as ui, but the elites' tokens (and so their text) are EVIL_TOKENS: escape
                    sequences (clear screen, OSC 52 clipboard write, OSC 8 hyperlink) and markup
                    (tests/system/test_security.py checks none reaches the terminal raw)

--record FILE appends every command line received to FILE (the tests read it back). $FAKE_WORKER_HOST, when
set, is the host name its session listings give.
Every mode ends itself after 60 s (SIGALRM), so a failing test leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's epo_tui, installed or not

from epo_tui import protocol  # noqa: E402
from epo_tui.engine.worker import EventWriter, answer_session_query  # noqa: E402
from epo_tui.features import FeatureEntry  # noqa: E402

OUT = sys.stdout.buffer
SESSION = "fake-session-1"


def emit(type_: str, id=None, flush: bool = True, **fields) -> None:
    OUT.write(protocol.encode(protocol.EVENTS[type_](id=id, **fields)))
    if flush:
        OUT.flush()


def raw(line: bytes) -> None:
    OUT.write(line)
    OUT.flush()


class Commands:
    """Command lines from stdin, each recorded first (when --record is given) and parsed."""

    def __init__(self, record: str | None):
        self.record = open(record, "a", encoding="utf-8") if record else None

    def __iter__(self):
        for line in sys.stdin.buffer:
            if self.record:
                self.record.write(line.decode("utf-8", "replace").rstrip("\n") + "\n")
                self.record.flush()
            try:
                yield protocol.parse_command(line)
            except protocol.ProtocolError as err:
                emit("error", id=err.id, kind="protocol", message=str(err), traceback=None)

    def one(self) -> None:
        """Waits for one command (so the test has a request pending), ignoring it."""
        next(iter(self), None)


def echo(commands: Commands) -> int:
    for cmd in commands:
        t, id_ = cmd.TYPE, cmd.id
        if t == "hello":
            emit("hello", id=id_, worker="fake", protocol=protocol.VERSION, pid=os.getpid())
        elif t == "load":
            emit("state", state="loading", detail="model and SAE")
            emit("state", state="idle", detail=None)
            emit("ready", id=id_, model="fake-model", sae="fake-sae", hook="blocks.0.hook_resid_pre", d_sae=16,
                 dtype="float32", devices=["cpu"], device_kind="cpu", config={}, labels=None)
        elif t == "features":
            emit("features", id=id_, features=[])
        elif t == "start":
            session = cmd.resume or SESSION
            emit("state", state="compiling", detail=None)
            emit("started", id=id_, session=session, label=None, iteration=7 if cmd.resume else 0,
                 iterations_total=100, lambdas=[1.0], elites=[])
            emit("state", state="running", detail=None)
        elif t in ("pause", "resume", "stop"):
            emit("state", id=id_, state={"pause": "paused", "resume": "running", "stop": "idle"}[t], detail=None)
        elif t == "score":
            if cmd.text == "__die__":
                sys.stderr.write("fake worker: crashing on request\n")
                sys.stderr.flush()
                os._exit(5)
            feature = cmd.feature if cmd.feature is not None else 0
            if feature < 0:
                emit("error", id=id_, kind="input", message=f"feature {feature} is out of range", traceback=None)
                continue
            words = cmd.text.split()
            emit("scored", id=id_, feature=feature, tokens=words, token_bytes=[w.encode().hex() for w in words],
                 token_ids=list(range(len(words))), activations=[0.5] * len(words),
                 xent=[None] + [1.0] * (len(words) - 1), prompt_start=0)
        elif t == "inject":
            emit("injected", id=id_, elite=0, act=1.0, xent=1.0, text=cmd.text)
        elif t == "shutdown":
            emit("bye", id=id_, reason="shutdown")
            return 0
    emit("bye", reason="end of input")
    return 0


def flood(n: int) -> int:
    emit("started", session="flood", label=None, iteration=0, iterations_total=n, lambdas=[1.0], elites=[])
    every = max(1, n // 10)
    for i in range(1, n + 1):  # no flush: as fast as the pipe takes it
        frontier = [protocol.FrontierPoint(iteration=i, xent=1.0, objective=0.0, act=1.0, token_ids=[1], text="a")
                    ] if i % 100 == 0 else []
        emit("progress", flush=False, session="flood", iteration=i, iterations_total=n, it_per_s=None, elites=[],
             frontier_new=frontier, best_objective=float(i))
        if i % every == 0:
            emit("log", flush=False, level="info", message=f"at {i}")
    emit("finished", session="flood", status="finished", iteration=n, iterations_total=n, folder="/nowhere")
    emit("bye", reason="done")
    return 0


def die_after(k: int, commands: Commands) -> int:
    commands.one()
    for i in range(k):
        emit("log", level="info", message=f"event {i}")
    for i in range(30):
        sys.stderr.write(f"fake stderr line {i}\n")
    sys.stderr.flush()
    os._exit(3)


def sigkill_self(commands: Commands) -> int:
    commands.one()
    sys.stderr.write("fake worker: about to SIGKILL myself\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    return 1


def garbage() -> int:
    raw(b"this is not json\n")
    raw(b"\xff\xfe not utf-8\n")
    raw(b"[1, 2, 3]\n")
    raw(b'{"v": 1, "type": "nope"}\n')
    raw(b'{"v": 99, "type": "log", "level": "info", "message": "from the future"}\n')
    raw(b'{"v": 1, "type": "log", "level": "info", "message": 5}\n')  # a field of the wrong type
    emit("log", level="info", message="between garbage")
    raw(b'{"x": "' + b"a" * (protocol.MAX_LINE_BYTES + 100) + b'"}\n')  # within the stream's margin
    raw(b'{"x": "' + b"b" * (3 * protocol.MAX_LINE_BYTES) + b'"}\n')  # far beyond it
    emit("log", level="info", message="after garbage")
    emit("bye", reason="done")
    return 0


def sleep(commands: Commands) -> int:
    for _ in commands:
        pass
    return 0


def hang_on_shutdown(commands: Commands) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for _ in commands:
        pass
    while True:
        time.sleep(1)


UI_PENALTY_SCALE = "λ = 1 prices a nat at 0.75 (a tenth of the dataset maximum, 7.5)"  # `started`'s line
UI_TOKENS = [" Debian", " is", " a", " free", " operating", " system", " for", " servers"]
EVIL_TOKENS = ["\x1b[2J", " EVIL\x1b]52;c;RVZJTA==\x07", "\x1b]8;;http://evil.example/\x1b\\link\x1b]8;;\x1b\\",
               "</code>", "```", "<script>alert(1)</script>", "[x](javascript:alert(1))",
               "<!-- epo-tui favorite -->"]


def ui_label(index: int) -> str | None:
    """The `ui` mode's label of a feature: two in three have one."""
    return f"mentions of topic {index}" if index % 3 else None


def ui_elite(k: int, iteration: int) -> protocol.Elite:
    """Elite k at `iteration`: fixed tokens, activations rising with the iteration, lower k more fluent.
    No token_bytes (as in files written before the field): the tokens are shown as they are."""
    tokens = ["<|endoftext|>"] + UI_TOKENS[k % 3:] + UI_TOKENS[:k % 3]
    acts = [0.0] + [round((i % 4) * 0.5 + 0.1 * iteration + 0.2 * k, 3) for i in range(len(UI_TOKENS))]
    act = max(acts)
    return protocol.Elite(penalty=[1.0, 3.0, 7.0, 20.0][k], token_ids=list(range(len(tokens))), tokens=tokens,
                          activations=acts, prompt_start=1, act=act, xent=round(5.5 - 0.5 * k + 0.05 * iteration, 3),
                          objective=act, text="".join(tokens[1:]))


def ui(commands: Commands, ending: str | None) -> int:
    for cmd in commands:
        t, id_ = cmd.TYPE, cmd.id
        if t == "hello":
            emit("hello", id=id_, worker="fake", protocol=protocol.VERSION, pid=os.getpid())
        elif t == "load":
            emit("state", state="idle", detail=None)
            emit("ready", id=id_, model="demo/model", sae="demo/sae", hook="blocks.2.hook_resid_pre", d_sae=40,
                 neuronpedia_id=os.environ.get("FAKE_NEURONPEDIA_ID", "demo/2-res") or None,
                 dtype="float32", devices=["TFRT_CPU_0"], device_kind="cpu", config={}, labels=None)
        elif t == "features":
            features = [FeatureEntry(index=i, top_tokens=(f" tok{i}", f" word{i % 7}"), top_token_ids=(i, i + 1),
                                     label=ui_label(i)) for i in range(40)]
            emit("features", id=id_, features=features)
        elif t in ("sessions", "session"):  # the real worker's answers, from the real sessions folder
            answer_session_query(cmd, EventWriter(OUT), None)
        elif t == "pause" or (t == "resume" and cmd.session is None):
            emit("state", id=id_, state="paused" if t == "pause" else "running", detail=None)
        elif t == "stop":
            emit("state", state="stopping", detail=None)
            emit("finished", id=id_, session="20261125-120000-abc123", status="stopped", iteration=5,
                 iterations_total=100, folder="/data/epo-tui/sessions/20261125-120000-abc123")
            emit("state", state="idle", detail=None)
        elif t == "inject":
            emit("injected", id=id_, elite=3, act=1.5, xent=4.5, text=cmd.text)
        elif t == "score":
            words = cmd.text.split()
            emit("scored", id=id_, feature=cmd.feature if cmd.feature is not None else 24,
                 tokens=["<|endoftext|>"] + words, token_bytes=[],
                 token_ids=list(range(len(words) + 1)), activations=[22.5] + [1.0] * len(words),  # BOS fires
                 xent=[None] + [2.0] * len(words), prompt_start=1,
                 # latents 7 and 24 fire on it, 7 the most; at most as many as asked for
                 top_features=[protocol.TopFeature(index=7, act=3.5, position=1),
                               protocol.TopFeature(index=24, act=1.0, position=1)][:cmd.top_features or 0])
        elif t in ("start", "resume"):  # a new search, or a saved session resumed
            index = (cmd.feature or {}).get("index", 24) if t == "start" else 24
            resumed = cmd.resume if t == "start" else cmd.session
            emit("state", state="compiling", detail=None)
            emit("started", id=id_, session=resumed or "20261125-120000-abc123", label=f"feature {index}",
                 feature_label=ui_label(index),
                 feature={"kind": "sae", "indices": [index], "combine": "lp"}, iteration=0, iterations_total=100,
                 lambdas=[1.0, 3.0, 7.0, 20.0], elites=[ui_elite(k, 0) for k in range(4)],
                 penalty_scale=UI_PENALTY_SCALE)
            emit("state", state="running", detail=None)
            for it in range(1, 6):
                # every elite is among its iteration's frontier points, so the screen ends the same
                # whether the client hands the UI these events one by one or coalesced
                elites = [ui_elite(k, it) for k in range(4)]
                points = [protocol.FrontierPoint(iteration=it, xent=e.xent, objective=e.act, act=e.act,
                                                 token_ids=e.token_ids, text=e.text) for e in elites]
                emit("progress", session="20261125-120000-abc123", iteration=it, iterations_total=100,
                     it_per_s=2.5, elites=elites, frontier_new=points, best_objective=max(e.act for e in elites))
            if ending == "finish":
                emit("checkpointed", session="20261125-120000-abc123", iteration=5)
                emit("finished", session="20261125-120000-abc123", status="finished", iteration=5,
                     iterations_total=5, folder="/data/epo-tui/sessions/20261125-120000-abc123")
                emit("state", state="idle", detail=None)
            elif ending == "die":
                for line in ("Traceback (most recent call last):", '  File "search.py", line 1, in step',
                             "RuntimeError: out of memory on device 0"):
                    sys.stderr.write(line + "\n")
                sys.stderr.flush()
                os._exit(3)
        elif t == "shutdown":
            emit("bye", id=id_, reason="shutdown")
            return 0
    return 0


def main(argv: list[str]) -> int:
    signal.alarm(60)
    if os.environ.get("FAKE_WORKER_HOST"):  # the host name its session listings give (a snapshot's)
        socket.gethostname = lambda: os.environ["FAKE_WORKER_HOST"]
    record = None
    if "--record" in argv:
        i = argv.index("--record")
        record = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    mode, args = argv[0], argv[1:]
    emit("hello", worker="fake", protocol=protocol.VERSION, pid=os.getpid())
    commands = Commands(record)
    if mode == "echo":
        return echo(commands)
    if mode == "flood":
        return flood(int(args[0]))
    if mode == "die-after":
        return die_after(int(args[0]), commands)
    if mode == "sigkill-self":
        return sigkill_self(commands)
    if mode == "garbage":
        return garbage()
    if mode == "sleep":
        return sleep(commands)
    if mode == "ui":
        return ui(commands, args[0] if args else None)
    if mode == "ui-evil":
        UI_TOKENS[:] = EVIL_TOKENS
        return ui(commands, args[0] if args else None)
    if mode == "hang-on-shutdown":
        return hang_on_shutdown(commands)
    sys.stderr.write(f"fake worker: unknown mode {mode!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

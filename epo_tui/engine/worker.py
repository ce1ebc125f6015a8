"""`epo-tui worker`: the engine served over stdin/stdout (protocol.py; PROTOCOL.md describes it).

One thread reads commands (a bounded queue); the main thread runs the search and, between two
iterations, every command that arrived, so `pause` and `score` take effect within one iteration. A
search whose `search.time_budget` has run out (paused time not counted) stops there as `stop` would.
Events go out through one lock-guarded writer. Stdout carries only protocol lines: the real stdout is
kept for them and file descriptor 1 is pointed at stderr, so a library's print can never corrupt the
stream. Stdin closing (the client died, the SSH link dropped), SIGTERM and SIGHUP checkpoint the
running search and exit; the session stays resumable.

Faults on disk never end the worker. A checkpoint that cannot be written (disk full) is an `error`
event of kind `session` naming the file; the search goes on in memory and tries again at its next
checkpoint (`checkpoint_seconds` later), while the session on disk keeps its last good checkpoint and
resumes from it. A session folder deleted under a running search stops that search (nothing of it
can be saved any more) with one `error` event; the worker goes idle and keeps serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from epo_tui import __version__, paths, protocol, results, session_catalog, sessions
from epo_tui.budget import Deadline, budget_seconds
from epo_tui.config import Config, config_from_data, load_config
from epo_tui.errors import ConfigError, UserError

if TYPE_CHECKING:  # imported when a search starts: the worker says hello before JAX loads
    from epo_tui.engine.session_search import RecordedSearch

COMMAND_QUEUE = 256  # commands waiting; a client that floods the worker waits on its pipe instead
IDLE_POLL_S = 0.5
_EOF = object()


class EventWriter:
    """Protocol lines to the client, one writer at a time; a closed pipe turns sends into no-ops."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.lock, self.closed = stream, threading.Lock(), False

    def send(self, message: protocol.Event) -> None:
        self.send_line(protocol.encode(message))

    def send_line(self, line: bytes) -> None:
        with self.lock:
            if self.closed:
                return
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, OSError):
                self.closed = True

    def error(self, kind: str, message: str, id: Any = None, trace: str | None = None) -> None:
        self.send(protocol.Error(id=id, kind=kind, message=message, traceback=trace))


class LogEvents(logging.Handler):
    """Warnings and errors that libraries log (and Python warnings) become `log` events, one line each,
    instead of going unseen on the worker's stderr."""

    def __init__(self, out: EventWriter):
        super().__init__(level=logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not stop the worker
            message = str(record.msg)
        lines = message.strip().splitlines() or [""]
        self.out.send(protocol.Log(level=record.levelname.lower(), message=f"{record.name}: {lines[0]}"))


def read_commands(stdin: BinaryIO, commands: queue.Queue, out: EventWriter, sessions_root: Path | None = None
                  ) -> None:
    """The reader thread: every line becomes a Command in the queue or an error event; EOF ends it.
    `sessions` and `session` are answered here at once (answer_session_query)."""
    limit = protocol.MAX_LINE_BYTES
    while True:
        try:
            line = stdin.readline(limit + 1)
        except (OSError, ValueError):
            line = b""
        if not line:
            commands.put(_EOF)
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the huge line, bounded reads
                line = stdin.readline(limit)
            out.error("protocol", f"line longer than {limit:,} bytes: skipped")
            continue
        if not line.strip():
            continue
        try:
            command = protocol.parse_command(line)
        except protocol.ProtocolError as err:
            out.error("protocol", str(err), id=err.id)
            continue
        if isinstance(command, (protocol.SessionsCommand, protocol.SessionCommand)):
            answer_session_query(command, out, sessions_root)
        else:
            commands.put(command)


def answer_session_query(cmd: protocol.SessionsCommand | protocol.SessionCommand, out: EventWriter,
                         sessions_root: Path | None) -> None:
    """Answers `sessions` or `session`. They only read files, so the reader thread answers them at once:
    the sessions browser opens while a model loads or a long iteration runs."""
    try:
        if isinstance(cmd, protocol.SessionsCommand):
            answer: protocol.Event = session_catalog.session_list(sessions_root)
        else:
            answer = session_catalog.session_details(cmd.session, sessions_root)
        out.send(dataclasses.replace(answer, id=cmd.id))
    except UserError as err:  # no such session, a damaged file (SessionError names it)
        out.error("input", str(err), id=cmd.id)
    except OSError as err:
        out.error("session", f"cannot read the sessions folder: {err.strerror or err}", id=cmd.id)
    except Exception as err:  # noqa: BLE001 - the reader must go on reading
        out.error("internal", f"{type(err).__name__}: {err}", id=cmd.id, trace=traceback.format_exc())


class Worker:
    def __init__(self, out: EventWriter, commands: queue.Queue, sessions_root: Path | None = None):
        self.out, self.commands, self.sessions_root = out, commands, sessions_root
        self.config: Config | None = None
        self.pair = None
        self.labels: dict[int, str] = {}  # from the config's sae.labels, checked against the loaded SAE
        self.active = None  # RecordedSearch
        self.deadline = Deadline(None)  # the active search's time budget (search.time_budget)
        self.paused = False
        self.running = True
        self.handlers = {protocol.HelloCommand: self.cmd_hello, protocol.LoadCommand: self.cmd_load,
                         protocol.FeaturesCommand: self.cmd_features, protocol.StartCommand: self.cmd_start,
                         protocol.PauseCommand: self.cmd_pause, protocol.ResumeCommand: self.cmd_resume,
                         protocol.StopCommand: self.cmd_stop, protocol.ScoreCommand: self.cmd_score,
                         protocol.InjectCommand: self.cmd_inject, protocol.ShutdownCommand: self.cmd_shutdown}

    # -- the loop

    def serve(self) -> int:
        self.out.send(_hello())
        self.set_state("idle")
        while self.running:
            searching = self.active is not None and not self.paused
            self.handle_pending(block=not searching)
            if self.running and self.active is not None and not self.paused:
                self.guarded(None, self.iterate)
        return 0

    def handle_pending(self, block: bool) -> None:
        try:
            item = self.commands.get(timeout=IDLE_POLL_S) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is _EOF:
                self.shutdown("the client closed the worker's input")
                return
            self.guarded(item.id, self.dispatch, item)
            if not self.running:
                return
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                return

    def guarded(self, id_: Any, fn, *args) -> None:
        """Runs fn; a user's mistake becomes an `input` error, anything else an `internal` one."""
        try:
            fn(*args)
        except sessions.SessionGone as err:
            if self.active is not None and err.folder == self.active.session.folder:
                self.lose_active(id_)
            else:
                self.out.error("input", str(err), id=id_)
        except ConfigError as err:
            self.out.error("config", str(err), id=id_)
        except UserError as err:
            self.out.error("input", str(err), id=id_)
        except Exception as err:  # noqa: BLE001 - the worker keeps serving
            self.out.error("internal", f"{type(err).__name__}: {err}", id=id_, trace=traceback.format_exc())
            if self.active is not None and fn == self.iterate:
                self.stop_active("crashed", error=f"{type(err).__name__}: {err}")

    def dispatch(self, cmd: protocol.Command) -> None:
        self.handlers[type(cmd)](cmd)

    def set_state(self, state: str, detail: str | None = None, id_: Any = None) -> None:
        self.out.send(protocol.State(id=id_, state=state, detail=detail))

    # -- commands

    def cmd_hello(self, cmd: protocol.HelloCommand) -> None:
        self.out.send(_hello(cmd.id))

    def cmd_load(self, cmd: protocol.LoadCommand) -> None:
        given = [k for k, value in (("config", cmd.config), ("config_path", cmd.config_path), ("demo", cmd.demo))
                 if value not in (None, False)]
        if len(given) > 1:
            raise UserError(f"load: give one of config, config_path, demo (got {', '.join(given)})")
        if self.active is not None:
            raise UserError("load: a search is running; stop it first")
        if cmd.config is not None:
            config = config_from_data(cmd.config, source="the load command")
        elif cmd.demo:
            config = load_config(str(paths.demo_config_file()))
        else:
            config = load_config(cmd.config_path)
        self.load(config, cmd.id)

    def load(self, config: Config, id_: Any = None) -> None:
        import jax

        from epo_tui.engine.compile_cache import enable_compile_cache
        from epo_tui.engine.pairing import load_model_with_sae

        self.set_state("loading", "model and SAE")
        enable_compile_cache()
        try:
            self.pair = load_model_with_sae(config)
        finally:
            self.set_state("idle")
        self.config = config
        label_notes = self._read_labels(config)
        devices = jax.local_devices()
        self.out.send(protocol.Ready(
            id=id_, model=self.pair.model.name, sae=self.pair.sae.display_name, hook=self.pair.sae.hook_name,
            d_sae=int(self.pair.sae.d_sae), neuronpedia_id=self.pair.sae.neuronpedia_id,
            dtype=self.pair.model.dtype, devices=[str(d) for d in devices], device_kind=devices[0].device_kind,
            model_parallel=int(self.pair.mesh.shape["model"]), config=config.to_dict(), labels=config.sae.labels))
        for level, message in label_notes:
            self.out.send(protocol.Log(level=level, message=message))

    def _read_labels(self, config: Config) -> list[tuple[str, str]]:
        """Reads the config's labels export for the loaded SAE into self.labels; returns (level, message)
        log lines for the client: what the reader skipped or could not check, or why no label was applied
        (an export for another SAE, a damaged file). The model is usable either way."""
        from epo_tui.features import config_labels

        self.labels = {}
        try:
            imported = config_labels(config.sae.labels, self.pair.sae)
        except UserError as err:
            return [("warning", f"sae.labels not applied: {err}")]
        if imported is None:
            return []
        self.labels = imported.labels
        return [("info", f"sae.labels {config.sae.labels}: {note}") for note in imported.notes]

    def _need_pair(self, what: str) -> None:
        if self.pair is None:
            raise UserError(f"{what}: no model loaded (send 'load' first)")

    def cmd_features(self, cmd: protocol.FeaturesCommand) -> None:
        from epo_tui.engine.feature_catalog import feature_catalog
        from epo_tui.features import with_labels

        self._need_pair("features")
        entries = with_labels(feature_catalog(self.pair), self.labels)
        self.out.send(protocol.FeatureList(id=cmd.id, features=entries))

    def cmd_start(self, cmd: protocol.StartCommand) -> None:
        if not cmd.resume:
            self.begin("start", cmd.id, cmd.checkpoint_seconds, lambda every: self.new_search(cmd, every))
            return
        search = cmd.search or {}
        if cmd.feature or cmd.seed_prompt or set(search) - {"iterations"}:
            raise UserError("start: a resumed session keeps its config; only search.iterations (the new "
                            "total) may be given")
        self.begin("start", cmd.id, cmd.checkpoint_seconds,
                   lambda every: self.resumed_search(cmd.resume, search.get("iterations"), every))

    def begin(self, verb: str, id_: Any, checkpoint_seconds: float | None, make) -> None:
        """Makes the active search with `make(checkpoint_seconds)` (a new one or a resumed session) and
        says `started`; `verb` names the command in errors."""
        from epo_tui.engine.reporting import feature_record
        from epo_tui.engine.session_search import CHECKPOINT_SECONDS

        self._need_pair(verb)
        if self.active is not None:
            raise UserError(f"{verb}: a search is running; stop it first")
        every = CHECKPOINT_SECONDS if checkpoint_seconds is None else checkpoint_seconds
        if not 0 <= every <= CHECKPOINT_SECONDS:
            raise UserError(f"{verb}: checkpoint_seconds must be between 0 and {CHECKPOINT_SECONDS:g}")
        deadline = Deadline(None)  # set-up counts too, as in `epo-tui run`
        self.set_state("compiling", "starting prompts")
        try:
            self.active = make(every)
        except BaseException:
            self.set_state("idle")
            raise
        self.paused = False
        active = self.active
        deadline.seconds = budget_seconds(active.search.config.search.time_budget)  # a resumed one: afresh
        self.deadline = deadline
        self.out.send(protocol.Started(
            id=id_, session=active.session.id, label=active.label(), feature_label=active.feature_label,
            feature=feature_record(active.search).to_json(),
            iteration=active.state.iteration, iterations_total=active.iterations_total,
            lambdas=[float(x) for x in active.search.lambdas_K], elites=active.elites(),
            penalty_scale=active.search.objective_scale.describe()))
        self.set_state("running")

    def new_search(self, cmd: protocol.StartCommand, every: float) -> RecordedSearch:
        from epo_tui.engine.sae import check_feature_index
        from epo_tui.engine.session_search import RecordedSearch, with_overrides

        config = with_overrides(self.config, cmd.feature, cmd.search)
        if config.feature.kind in ("sae", "direction"):
            for index in config.feature.features:
                check_feature_index(self.pair.sae, index, source="start: feature")
        return RecordedSearch.start(self.pair, config, seed_prompt=cmd.seed_prompt, label=self._label(config),
                                    root=self.sessions_root, checkpoint_seconds=every)

    def resumed_search(self, query: str, iterations_total: int | None, every: float) -> RecordedSearch:
        """The saved session `query` names, from its checkpoint, on the loaded model and SAE."""
        from epo_tui.engine.session_search import RecordedSearch

        session = sessions.find_session(query, root=self.sessions_root)
        self._check_same_pair(session)
        return RecordedSearch.resume(self.pair, session, iterations_total=iterations_total, checkpoint_seconds=every)

    def _label(self, config: Config) -> str | None:
        if not self.labels or config.feature.kind not in ("sae", "direction"):
            return None
        return " + ".join(self.labels.get(i, f"#{i}") for i in config.feature.features)

    def iterate(self) -> None:
        active = self.active
        if self.deadline.expired:  # ran out during the set-up, or while commands were handled
            self.stop_out_of_time()
            return
        changed = active.advance()
        self.out.send(protocol.Progress(
            session=active.session.id, iteration=active.state.iteration, iterations_total=active.iterations_total,
            it_per_s=active.iterations_per_second(), budget_left_s=self.deadline.left_s(), elites=active.elites(),
            frontier_new=changed["frontier_new"], best_objective=float(active.state.best_objective_history[-1])))
        if self.checkpoint_or_say(active.checkpoint_if_due):
            self._say_checkpointed(active)
        if active.done:
            self.stop_active("finished")
        elif self.deadline.expired:
            self.stop_out_of_time()

    def stop_out_of_time(self) -> None:
        """The time budget ran out: stopped as `stop` would, but its result says why (not interrupted)."""
        active = self.active
        timings = results.RunTimings(iterations_requested=active.iterations_total, iteration_s=list(active.seconds),
                                     time_budget_s=self.deadline.seconds, budget_ran_out=True)
        self.stop_active("stopped", timings=timings, reason=f"its time budget ({self.deadline.describe()}) ran out")

    def checkpoint_or_say(self, checkpoint, *args) -> bool:
        """Runs a checkpoint of the active search; a write that fails (disk full) becomes one `error`
        event and the search goes on: it tries again at its next checkpoint, and the session on disk
        keeps its last good one (stopping instead would save nothing more and end a search the user
        can rescue by freeing space). A deleted session folder is raised (guarded() stops the search)."""
        try:
            return checkpoint(*args) is not False
        except sessions.SessionGone:
            raise
        except sessions.SessionError as err:
            self.out.error("session", f"{err}: checkpoint not saved; the search goes on and tries again in "
                           f"{self.active.checkpoint_seconds:g} s (the session resumes from its last checkpoint)")
            return False

    def lose_active(self, id_: Any = None) -> None:
        """The active session's folder was deleted: the search stops (nothing of it can be saved)."""
        active, self.active, self.paused = self.active, None, False
        with contextlib.suppress(Exception):
            active.release()
        self.out.error("session", f"{_folder_deleted(active)}: the search stopped at iteration "
                       f"{active.state.iteration}", id=id_)
        self.set_state("idle")

    def stop_active(self, status: str, error: str | None = None, id_: Any = None,
                    timings: results.RunTimings | None = None, reason: str | None = None) -> None:
        active, self.active, self.paused = self.active, None, False
        if active is None:
            return
        try:
            active.finish(status, error, timings=timings)
        except sessions.SessionError as err:  # stopped all the same; the session keeps its last good checkpoint
            with contextlib.suppress(Exception):
                active.release()
            message = _folder_deleted(active) if isinstance(err, sessions.SessionGone) else f"{err}: not saved"
            self.out.error("session", f"{message}: the search stopped at iteration {active.state.iteration}",
                           id=id_)
            self.set_state("idle")
            return
        self._say_checkpointed(active)
        self.out.send(protocol.Finished(id=id_, session=active.session.id, status=status,
                                        iteration=active.state.iteration, iterations_total=active.iterations_total,
                                        folder=str(active.session.folder), reason=reason))
        self.set_state("idle")

    def _say_checkpointed(self, active: RecordedSearch) -> None:
        self.out.send(protocol.Checkpointed(session=active.session.id, iteration=active.state.iteration))

    def cmd_pause(self, cmd: protocol.PauseCommand) -> None:
        if self.active is None:
            raise UserError("pause: no search is running")
        if not self.paused:
            self.paused = True
            self.deadline.pause()  # a paused search spends none of its time budget
            if self.checkpoint_or_say(self.active.checkpoint, "paused"):
                self._say_checkpointed(self.active)
        self.set_state("paused", id_=cmd.id)

    def _check_same_pair(self, session) -> None:
        """A session resumes only on the model and SAE it ran with (the worker loads one pair)."""
        from epo_tui.engine.session_search import session_config

        theirs = session_config(session)
        if theirs.model != self.config.model or dataclasses.replace(theirs.sae, labels=None) != \
                dataclasses.replace(self.config.sae, labels=None):
            raise UserError(f"session {session.id} ran on another model or SAE "
                            f"({_pair_name(theirs)}; loaded: {_pair_name(self.config)}): start epo-tui with "
                            "that session's config to resume it")

    def cmd_resume(self, cmd: protocol.ResumeCommand) -> None:
        if cmd.session is not None:
            self.begin("resume", cmd.id, None, lambda every: self.resumed_search(cmd.session, cmd.iterations, every))
            return
        if cmd.iterations is not None:
            raise UserError("resume: iterations goes with session (a paused search keeps its total)")
        if self.active is None:
            raise UserError("resume: no search is paused (to continue a saved session: resume with its session)")
        self.paused = False
        self.deadline.resume()
        self.active.session.update_meta(status="running")
        self.set_state("running", id_=cmd.id)

    def cmd_stop(self, cmd: protocol.StopCommand) -> None:
        if self.active is None:
            raise UserError("stop: no search is running")
        self.set_state("stopping")
        self.stop_active("stopped", id_=cmd.id)

    def cmd_score(self, cmd: protocol.ScoreCommand) -> None:
        from epo_tui.engine.scoring import score_text
        from epo_tui.engine.sae import check_feature_index

        self._need_pair("score")
        feature = cmd.feature
        if feature is None:
            feature = self.active.search.config.feature.features[0] if self.active else self.config.feature.index
        check_feature_index(self.pair.sae, feature, source="score: feature")
        prefix = self.active.search.config.search.prefix if self.active else self.config.search.prefix
        scored = score_text(self.pair, cmd.text, feature, prefix=prefix, top_features=cmd.top_features or 0)
        top = [protocol.TopFeature(**latent) for latent in scored.pop("top_features", [])]
        self.out.send(protocol.Scored(id=cmd.id, feature=int(feature), top_features=top, **scored))

    def cmd_inject(self, cmd: protocol.InjectCommand) -> None:
        if self.active is None:
            raise UserError("inject: no search is running")
        k, elite = self.active.inject(cmd.text)
        self.out.send(protocol.Injected(id=cmd.id, elite=k, act=elite.act, xent=elite.xent, text=elite.text))

    def cmd_shutdown(self, cmd: protocol.ShutdownCommand) -> None:
        self.shutdown(None, cmd.id)

    def shutdown(self, reason: str | None, id_: Any = None) -> None:
        """Checkpoints a running search as stopped (resumable), says bye, ends the loop."""
        if self.active is not None:
            with contextlib.suppress(Exception):
                self.stop_active("stopped", error=reason)
        self.out.send(protocol.Bye(id=id_, reason=reason))
        self.running = False


def _hello(id_: Any = None) -> protocol.Hello:
    return protocol.Hello(id=id_, worker=__version__, protocol=protocol.VERSION, pid=os.getpid())


def _folder_deleted(active: RecordedSearch) -> str:
    return f"session {active.session.id}'s folder was deleted ({active.session.folder})"


def serve(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None, sessions_root: Path | None = None) -> int:
    """Runs the worker until `shutdown` or end of input; stdout/stdin default to the process's."""
    if stdout is None:
        stdout = os.fdopen(os.dup(1), "wb", buffering=0)  # the protocol's own copy of stdout
        os.dup2(2, 1)  # and fd 1 (print, C libraries) goes to stderr from here on
        sys.stdout = sys.stderr
    stdin = stdin or sys.stdin.buffer
    out = EventWriter(stdout)
    commands: queue.Queue = queue.Queue(maxsize=COMMAND_QUEUE)
    threading.Thread(target=read_commands, args=(stdin, commands, out, sessions_root), daemon=True,
                     name="commands").start()
    worker = Worker(out, commands, sessions_root)
    logging.captureWarnings(True)
    logging.getLogger().addHandler(LogEvents(out))

    def stop_soon(signum, frame):  # SIGTERM / SIGHUP: finish this iteration, checkpoint, exit
        with contextlib.suppress(queue.Full):
            commands.put_nowait(_EOF)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_soon)
        signal.signal(signal.SIGHUP, stop_soon)
        signal.signal(signal.SIGINT, stop_soon)
    return worker.serve()


def _pair_name(config) -> str:
    model = config.model.path or config.model.name
    sae = config.sae.path or f"{config.sae.release}/{config.sae.id}"
    return f"{model} with {sae}"

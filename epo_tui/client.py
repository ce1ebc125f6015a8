"""The UI side of the worker protocol: start a worker process, talk to it, fan its events out.

Plain Python (asyncio and `epo_tui.protocol` only): the Textual app and the CLI both use it, and neither
may import the engine's heavy libraries (DESIGN.md §2). The worker runs in its own process (locally, or
remotely through a command such as `ssh host epo-tui worker`) so a crash or an out-of-memory there never
takes the UI down; this module turns such a death into an ordinary `error` event.

`WorkerClient` owns one worker process at a time. A reader task consumes the worker's stdout without
pause, so the worker never blocks on a full pipe because the UI is slow, and publishes every event,
parsed into its `protocol` dataclass, to a `Bus` (bus.py: bounded, progress coalesced). `request()`
pairs a command with its answer by `id`.

Besides the worker's own events (PROTOCOL.md), the client publishes:

- `WorkerStarted` (pid, command) when it starts a worker process;
- `Error` of kind "protocol" with origin "client" for a stdout line it cannot use (not JSON, an unknown
  event, a field of the wrong type);
- `Error` of kind "worker_died" (message, stderr_tail, returncode) when the worker ends without having
  said `bye`;
- `WorkerExited` (returncode, message) when it ends after `bye` or `close()`.

Everything here runs on one asyncio event loop; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import shlex
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from epo_tui import protocol
from epo_tui.bus import Bus, E
from epo_tui.errors import UserError

# A protocol line may be MAX_LINE_BYTES long; the margin lets such a line arrive whole so that
# protocol.parse_event rejects it with its own message. Longer lines are skipped while being read.
STREAM_LIMIT = protocol.MAX_LINE_BYTES + (64 << 10)
STDERR_LINES = 200  # kept for error reports
STDERR_TAIL = 20  # of those, sent along in a worker_died event
STDERR_LINE_CHARS = 2000  # a longer stderr line is cut: 200 lines must stay small
YIELD_EVERY = 64  # lines read from an already full buffer before letting other tasks run
SESSIONS_TIMEOUT_S = 60.0  # a cache of hundreds of sessions over a slow link still lists
EXIT_GRACE_S = 2.0  # how long stdout's end and the process's exit may lag behind each other

# Client-side error kinds (protocol.CLIENT_ERROR_KINDS), next to protocol.ERROR_KINDS (the worker's own).
WORKER_DIED, WORKER_EXITED, TIMEOUT, NOT_RUNNING = protocol.CLIENT_ERROR_KINDS


class WorkerError(Exception):
    """A command that failed: the worker answered with an `error`, gave no answer in time, or died.

    `kind` is one of protocol.ERROR_KINDS or a client-side kind ('worker_died', 'worker_exited',
    'timeout', 'not_running'); `event` is the error event when there was one.
    """

    def __init__(self, kind: str, message: str, event: protocol.Event | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.event = event


def default_command() -> list[str]:
    """The local worker, run by the same Python interpreter as the UI."""
    return [sys.executable, "-m", "epo_tui", "worker"]


def worker_command(text: str | None) -> list[str]:
    """The argv for a user-given worker command (e.g. `--worker "ssh host epo-tui worker"`).

    Split like a POSIX shell splits words, then run exactly as typed: never through a shell, so no
    globbing, variables or `;` take effect on this machine. None means the local default.
    """
    if text is None:
        return default_command()
    try:
        argv = shlex.split(text)
    except ValueError as err:  # shlex: "No closing quotation", "No escaped character"
        raise UserError(f"worker command {text!r} cannot be split into words: {str(err).lower()}") from None
    if not argv:
        raise UserError("the worker command is empty; give one such as 'ssh host epo-tui worker'")
    return argv


def describe_exit(returncode: int | None) -> str:
    """A process's end in a few words: 'exit code 3', 'killed by SIGKILL (signal 9)'."""
    if returncode is None:
        return "closed its output without exiting (stopped by the client)"
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            return f"killed by signal {number}"
        return f"killed by {name} (signal {number})"
    return f"exit code {returncode}"


# ------------------------------------------------------------------------------------------- client


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[tuple[bytes | None, int]]:
    """(line, size) for each line of a stream; (None, size) for a line longer than the stream's limit.

    An over-long line is discarded piece by piece as it arrives, so memory stays bounded and the rest
    of it is not mistaken for further lines (StreamReader.readline would do both wrong).
    """
    skipped = 0
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as err:  # end of stream, perhaps after a last unended line
            if skipped:
                yield None, skipped + len(err.partial)
            elif err.partial:
                yield err.partial, len(err.partial)
            return
        except asyncio.LimitOverrunError as err:
            await stream.readexactly(err.consumed)  # drop what is buffered; bytes up to the newline stay
            skipped += err.consumed
            continue
        if skipped:
            yield None, skipped + len(line)
            skipped = 0
        else:
            yield line, len(line)


class WorkerClient:
    """One worker process at a time, its events on `bus`, requests paired with answers by id.

    Use as `async with WorkerClient(command) as client:` or call start() and close(). The process runs
    in a new session (start_new_session) so the terminal's Ctrl-C and SIGHUP reach the UI only: the UI
    decides how the worker ends (close() asks it to shut down, which checkpoints a running search).
    """

    def __init__(self, command: Sequence[str] | None = None, *, bus: Bus | None = None,
                 on_stderr: Callable[[str], None] | None = None):
        if isinstance(command, str):
            raise TypeError("command is an argv list; split a command line with worker_command()")
        self.command = list(command) if command is not None else default_command()
        if not self.command:
            raise ValueError("the worker command is empty")
        self.bus = bus if bus is not None else Bus()
        self._owns_bus = bus is None
        self.on_stderr = on_stderr  # e.g. the CLI mirroring the worker's stderr
        self.hello: protocol.Hello | None = None  # the worker's start-up hello
        self.last_load: protocol.LoadCommand | None = None  # the last `load` sent, for restart()
        self.last_session: str | None = None  # from the last `started` event, for resume_last()
        self.returncode: int | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[protocol.Event]] = {}
        self._stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self._write_lock = asyncio.Lock()
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._said_bye = False
        self._closing = False

    # -- life cycle

    @property
    def running(self) -> bool:
        """A worker process was started and its end has not been seen yet."""
        return self._watcher is not None and not self._watcher.done()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Starts the worker process and the tasks that read its output."""
        if self.running:
            raise RuntimeError("the worker is already running")
        self._said_bye = self._closing = False
        self.returncode = None
        self.hello = None
        self._stderr.clear()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=STREAM_LIMIT, start_new_session=True)
        except FileNotFoundError:
            raise UserError(f"cannot start the worker: {self.command[0]!r} was not found") from None
        except PermissionError:
            raise UserError(f"cannot start the worker: {self.command[0]!r} is not executable") from None
        except OSError as err:
            raise UserError(f"cannot start the worker {shlex.join(self.command)!r}: "
                            f"{err.strerror or err}") from None
        self._process = process
        reader = asyncio.create_task(self._read_stdout(process.stdout))
        stderr_reader = asyncio.create_task(self._read_stderr(process.stderr))
        self._watcher = asyncio.create_task(self._watch(process, reader, stderr_reader))
        self.bus.publish(protocol.WorkerStarted(pid=process.pid, command=list(self.command)))

    async def close(self, shutdown_timeout: float = 5.0, terminate_timeout: float = 2.0) -> None:
        """Asks the worker to shut down; SIGTERM, then SIGKILL, when it does not exit in time.

        Closes the bus too when this client created it (its subscribers' loops then end).
        """
        await self._stop_process(shutdown_timeout, terminate_timeout)
        if self._owns_bus:
            self.bus.close()

    async def restart(self, *, resume: bool = False, timeout: float | None = None) -> protocol.Event | None:
        """A fresh worker with the same command: the UI's answer to a crash.

        Stops the current worker if it still runs, replays the last `load` (awaiting `ready`), and with
        resume=True resumes the last session (see resume_last). Returns the last answer, or None when
        there was nothing to replay. `timeout` applies to each answer: loading and compiling take long.
        """
        await self._stop_process(shutdown_timeout=5.0, terminate_timeout=2.0)
        await self.start()
        answer = None
        if self.last_load is not None:
            answer = await self.request(self.last_load, timeout=timeout)
        if resume:
            answer = await self.resume_last(timeout=timeout)
        return answer

    async def resume_last(self, timeout: float | None = None) -> protocol.Event:
        """Sends `start` resuming the last session seen in a `started` event; returns that answer."""
        if self.last_session is None:
            raise UserError("nothing to resume: no search has started through this client")
        return await self.request(protocol.StartCommand(resume=self.last_session), timeout=timeout)

    async def __aenter__(self) -> WorkerClient:
        if not self.running:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- commands

    async def send(self, command: protocol.Command) -> int:
        """Sends a command without waiting for its answer; returns its id (answers echo it)."""
        id_, _ = await self._send(command, expect_answer=False)
        return id_

    async def request(self, command: protocol.Command, timeout: float | None = 30.0) -> protocol.Event:
        """Sends a command and returns the first event answering it (same id).

        Raises WorkerError: the worker's `error` answer (its kind), 'timeout' after `timeout` seconds
        (None: wait as long as the worker lives), 'worker_died' or 'worker_exited' when it ends first.
        """
        id_, answer = await self._send(command, expect_answer=True)
        try:
            return await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            raise WorkerError(TIMEOUT, f"no answer to {command.TYPE!r} within {timeout:g} s") from None
        finally:
            self._waiting.pop(id_, None)

    async def sessions(self, timeout: float | None = SESSIONS_TIMEOUT_S) -> protocol.SessionList:
        """The saved sessions on the worker's host (`sessions`). WorkerError as for request()."""
        return await self._answer(protocol.SessionsCommand(), protocol.SessionList, timeout)

    async def session(self, session_id: str, timeout: float | None = SESSIONS_TIMEOUT_S) -> protocol.SessionDetails:
        """One saved session on the worker's host (`session`). WorkerError as for request()."""
        return await self._answer(protocol.SessionCommand(session=session_id), protocol.SessionDetails, timeout)

    async def _answer(self, command: protocol.Command, expected: type[E], timeout: float | None) -> E:
        answer = await self.request(command, timeout)
        if not isinstance(answer, expected):
            raise WorkerError("protocol", f"the worker answered {command.TYPE!r} with {answer.TYPE!r}", answer)
        return answer

    async def _send(self, command: protocol.Command, expect_answer: bool
                    ) -> tuple[int, asyncio.Future[protocol.Event] | None]:
        process = self._process
        if process is None or not self.running or process.stdin is None:
            raise WorkerError(NOT_RUNNING, "the worker is not running"
                              + (f" ({describe_exit(self.returncode)})" if self.returncode is not None else ""))
        id_ = next(self._ids)
        line = protocol.encode(dataclasses.replace(command, id=id_))
        if isinstance(command, protocol.LoadCommand):
            self.last_load = command
        answer = None
        if expect_answer:  # registered before writing: the answer can come before drain() returns
            answer = asyncio.get_running_loop().create_future()
            self._waiting[id_] = answer
        try:
            async with self._write_lock:  # one drain() at a time
                process.stdin.write(line)
                await process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            self._waiting.pop(id_, None)
            raise WorkerError(WORKER_DIED, "the worker's input is closed: it has exited") from None
        return id_, answer

    # -- reading

    def stderr_tail(self, lines: int = STDERR_TAIL) -> list[str]:
        """The last lines the worker wrote to stderr (of the last STDERR_LINES kept)."""
        return list(self._stderr)[-lines:] if lines > 0 else []

    def _protocol_error(self, message: str, line: bytes | None = None) -> None:
        excerpt = line[:120].decode("utf-8", "replace").rstrip("\r\n") if line is not None else None
        self.bus.publish(protocol.Error(kind="protocol", message=message, origin="client", excerpt=excerpt))

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        """Reads and publishes every event as it comes, so the worker never waits on a full pipe."""
        count = 0
        async for line, size in _lines(stream):
            count += 1
            if count % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # readuntil() does not yield while lines are buffered
            if line is None:
                self._protocol_error(f"the worker wrote a line of {size:,} bytes, longer than the "
                                     f"{protocol.MAX_LINE_BYTES:,} allowed; skipped")
                continue
            if not line.strip():
                continue
            try:
                event = protocol.parse_event(line)
            except protocol.ProtocolError as err:
                self._protocol_error(f"unreadable line from the worker: {err}", line)
                continue
            self._dispatch(event)

    def _dispatch(self, event: protocol.Event) -> None:
        if isinstance(event, protocol.Hello) and self.hello is None:
            self.hello = event
        elif isinstance(event, protocol.Started):
            self.last_session = event.session
        elif isinstance(event, protocol.Bye):
            self._said_bye = True
        answer = self._waiting.pop(event.id, None) if event.id is not None else None
        self.bus.publish(event)
        if answer is not None and not answer.done():
            if isinstance(event, protocol.Error):
                answer.set_exception(WorkerError(event.kind, event.message, event))
            else:
                answer.set_result(event)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        async for line, size in _lines(stream):
            if line is None:
                text = f"[a line of {size:,} bytes, skipped]"
            else:
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if len(text) > STDERR_LINE_CHARS:
                    text = text[:STDERR_LINE_CHARS] + "…"
            self._stderr.append(text)
            if self.on_stderr is not None:
                self.on_stderr(text)

    # -- the end

    async def _watch(self, process: asyncio.subprocess.Process, reader: asyncio.Task[None],
                     stderr_reader: asyncio.Task[None]) -> None:
        """Waits for the worker's end, then reports it once: worker_exited or worker_died.

        The end is the end of stdout or the process's exit, whichever comes first: a worker whose own
        child keeps the pipe open has still ended (returncode is polled: on Python 3.11 wait() also
        waits for the pipes). The other sign normally follows at once; it gets EXIT_GRACE_S.
        """
        loop = asyncio.get_running_loop()
        while not reader.done() and process.returncode is None:
            await asyncio.wait({reader}, timeout=0.25)
        deadline = loop.time() + EXIT_GRACE_S
        while process.returncode is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.wait({reader}, timeout=EXIT_GRACE_S)  # output still in the pipe after the exit
        await asyncio.wait({stderr_reader}, timeout=1.0)  # the stderr tail explains a death
        for task in (reader, stderr_reader):
            task.cancel()
        if process.returncode is None:  # closed its output but lives on: of no more use
            try:
                process.kill()
            except ProcessLookupError:
                pass
        self._report_end(process.returncode)

    def _report_end(self, returncode: int | None) -> None:
        self.returncode = returncode
        waiting, self._waiting = self._waiting, {}
        how = describe_exit(returncode)
        event: protocol.Event
        if self._said_bye or self._closing:
            kind, message = WORKER_EXITED, f"the worker exited: {how}"
            event = protocol.WorkerExited(returncode=returncode, message=message)
        else:
            kind = WORKER_DIED
            message = f"the worker died: {how}" + (" without saying bye" if returncode == 0 else "")
            event = protocol.Error(kind=WORKER_DIED, message=message, stderr_tail=self.stderr_tail(STDERR_TAIL),
                                   returncode=returncode)
        self.bus.publish(event)
        for answer in waiting.values():
            if not answer.done():
                answer.set_exception(WorkerError(kind, f"{message} before answering", event))

    async def _stop_process(self, shutdown_timeout: float, terminate_timeout: float) -> None:
        process, watcher = self._process, self._watcher
        if process is None or watcher is None:
            return
        self._closing = True
        if not watcher.done():
            try:
                await self.send(protocol.ShutdownCommand())
            except WorkerError:
                pass
            if process.stdin is not None:
                process.stdin.close()  # end of input also means shutdown to the worker
            for signal_number, timeout in ((None, shutdown_timeout), (signal.SIGTERM, terminate_timeout),
                                           (signal.SIGKILL, 5.0)):
                if signal_number is not None and process.returncode is None:
                    try:
                        process.send_signal(signal_number)
                    except ProcessLookupError:
                        pass
                await asyncio.wait({watcher}, timeout=timeout)
                if watcher.done():
                    break
        await watcher

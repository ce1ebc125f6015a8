"""`epo-tui bench --ui`: how fast the UI answers a key while a search runs at full load.

The UI runs as a user runs it: `EpoApp` with Textual's real Linux driver in a child process whose
terminal is a pseudo-terminal, starting its own worker. This process is the terminal: it feeds every
byte the app writes to a pyte screen (a maintained VT100 emulator rather than a hand-written one) and
types keys into the pty as a keyboard would. It answers the app's synchronized-output query (as
modern terminals do), so each frame arrives between `ESC[?2026h` and `ESC[?2026l` and a repaint counts
once its whole frame is in.

Measured:
- first paint: process start (just before the spawn) to the first frame with text in the status bar
  (the loading state), and what it said; then to `ready` and to the search's first iterations;
- key press to repaint: with the search running (progress arriving), `down`/`up` alternately in the
  feature list (focused by default), each followed by a random gap of 20-100 ms; for each press, the
  time from writing the key's bytes to the pty to reading the end of the first frame in which the
  highlight has moved to the expected row (the row's first and last cells carry the cursor's
  background, the row it left does not). Nothing in the app is patched: the child only adds a report,
  once, of where the feature list is on screen and which session the search made;
- the search meanwhile: iterations and it/s, read off the status bar the user sees.

At the end `q` quits as a user would (the worker checkpoints); the session the bench made is deleted.

    python -m epo_tui.bench.ui_latency SPEC.json   (internal: the child, the app on the pty)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from epo_tui.bench.report import Progress, console, load_average, load_text, print_goals, quiet
from epo_tui.bench.report import machine as report_machine
from epo_tui.errors import UserError

DEFAULT_PRESSES = 200
DEFAULT_SIZE = (120, 36)  # columns, rows
GAP_S = (0.02, 0.10)  # random pause after each repaint before the next press
GOALS = {"p99_s": 0.100, "first_paint_s": 1.0}
SEARCH_ITERATIONS = 100_000  # never ends during the bench
WARMUP_ITERATIONS = 2  # the search counts as running at full load from this iteration on
FIRST_PAINT_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 600.0  # loading a large model can take minutes (the app's own load timeout)
PRESS_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 60.0
KEYS = {"down": b"\x1b[B", "up": b"\x1b[A"}
SYNC_QUERY = b"\x1b[?2026$p"  # Textual asks whether the terminal supports synchronized output
SYNC_REPLY = b"\x1b[?2026;2$y"  # supported (currently reset): Textual then brackets every frame
SYNC_START, SYNC_END = b"\x1b[?2026h", b"\x1b[?2026l"
MARK = re.compile(re.escape(b"\x1b[?2026") + rb"(?:\$p|h|l)")
ITERATION = re.compile(r"iteration (\d+)/(\d+)")
RATE = re.compile(r"([0-9.]+) it/s")

# ----------------------------------------------------------------------------------------------
# The terminal: a pyte screen of what the app wrote, and its frames


class TerminalScreen:
    """What the app writes: a pyte screen fed with it, and the synchronized-output frames it brackets.

    The frame marks are found on the raw bytes (a mark cut by the end of a read waits for its rest);
    pyte has every byte up to a frame's end when `on_frame` is called. `frames` counts frame ends."""

    def __init__(self, columns: int, rows: int):
        import pyte  # here, not at the top: `epo-tui --help` builds this module's options without it

        self.screen = pyte.Screen(columns, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.held = b""  # the start of a frame mark at the end of a read
        self.frames = 0
        self.in_frame = False  # between a frame's start and end marks
        self.sync_queried = False
        self.on_frame: Callable[[], None] | None = None

    def feed(self, data: bytes) -> None:
        data, pos = self.held + data, 0
        for mark in MARK.finditer(data):
            self.stream.feed(data[pos:mark.end()])
            pos = mark.end()
            if mark[0] == SYNC_QUERY:
                self.sync_queried = True
            elif mark[0] == SYNC_START:
                self.in_frame = True
            else:
                self.in_frame = False
                self.frames += 1
                if self.on_frame is not None:
                    self.on_frame()
        cut = data.rfind(b"\x1b", pos)
        if cut < 0 or not any(whole.startswith(data[cut:]) for whole in (SYNC_QUERY, SYNC_START, SYNC_END)):
            cut = len(data)
        self.stream.feed(data[pos:cut])
        self.held = data[cut:]

    def text(self, row: int) -> str:
        return self.screen.display[row].strip()

    def bg(self, row: int, column: int) -> str:
        """The cell's background: 'default', a colour's name (SGR 40-47, 100-107) or hex (256 colours, RGB)."""
        return self.screen.buffer[row][column].bg


class _Text:
    """A pyte listener that keeps only the text and the line feeds (to read the child's last words)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def draw(self, text: str) -> None:
        self.parts.append(text)

    def linefeed(self) -> None:
        self.parts.append("\n")

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


# ----------------------------------------------------------------------------------------------
# The child: the app on the pty


def _child(spec_path: str) -> int:
    """Runs EpoApp on this process's terminal; tells the bench (once) where the feature list is."""
    import fcntl
    import termios

    # A session leader without a terminal (the bench started it so): the pty becomes its controlling
    # terminal, as a terminal window's is (closing it, e.g. when the bench dies, hangs the app up).
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    from epo_tui.config import config_from_data
    from epo_tui.tui.app import EpoApp, LoadSpec
    from epo_tui.tui.components.features import FeatureList

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    info = Path(spec["info"])

    class BenchedApp(EpoApp):
        """EpoApp plus one report when the search starts (after that frame): nothing else changes."""

        told = False

        def on_worker_started(self, message) -> None:  # Textual runs EpoApp's handler too (the MRO's)
            if not self.told:
                self.told = True
                self.call_after_refresh(self.tell, message.event.session)

        def tell(self, session: str) -> None:
            feature_list = self.query_one(FeatureList)
            region = feature_list.scrollable_content_region
            data = {"session": session, "region": [region.x, region.y, region.width, region.height],
                    "cursor": feature_list.cursor, "scroll_y": feature_list.scroll_offset.y,
                    "rows": feature_list.row_count}
            staging = info.with_suffix(".tmp")
            staging.write_text(json.dumps(data), encoding="utf-8")
            os.replace(staging, info)

    config = config_from_data(spec["config"], source=spec["source"])
    BenchedApp(config, LoadSpec({"config": spec["config"]})).run()
    return 0


# ----------------------------------------------------------------------------------------------
# The bench: the terminal side


class _Terminal:
    """The child on a pseudo-terminal, and this process reading everything it writes."""

    def __init__(self, spec_path: Path, columns: int, rows: int):
        import fcntl
        import termios

        self.screen = TerminalScreen(columns, rows)
        self.tail = b""  # the last output, for an error message if the child dies
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TEXTUAL_COLOR_SYSTEM")}
        env.update(TERM="xterm-256color", COLORTERM="truecolor")
        self.master = master
        self.started = time.perf_counter()
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "epo_tui.bench.ui_latency", str(spec_path)],
                                            stdin=slave, stdout=slave, stderr=slave, env=env,
                                            start_new_session=True, close_fds=True)
        finally:
            os.close(slave)
        self.replied = False

    def press(self, key: bytes) -> float:
        os.write(self.master, key)
        return time.perf_counter()

    def pump(self, timeout: float) -> float | None:
        """Reads what arrives within `timeout` seconds (one read); returns when it was read, or None."""
        ready, _, _ = select.select([self.master], [], [], max(timeout, 0.0))
        if not ready:
            return None
        try:
            data = os.read(self.master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        read_at = time.perf_counter()
        if not data:
            raise UserError(f"the UI exited early ({self._exit_text()}): {self.last_words()}")
        self.tail = (self.tail + data)[-4000:]
        self.screen.feed(data)
        if self.screen.sync_queried and not self.replied:
            self.replied = True
            os.write(self.master, SYNC_REPLY)
        return read_at

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Reads until `condition` holds at the end of a frame (or at the end of a read outside a frame,
        while the app does not bracket its frames yet); returns when the read that completed it arrived."""
        met = False

        def at_frame_end() -> None:
            nonlocal met
            met = met or condition()

        deadline = time.perf_counter() + timeout
        self.screen.on_frame = at_frame_end
        try:
            while True:
                read_at = self.pump(deadline - time.perf_counter())
                if read_at is not None and (met or (not self.screen.in_frame and condition())):
                    return read_at
                if time.perf_counter() > deadline:
                    self._fail_if_dead()
                    raise UserError(f"timed out after {timeout:.0f} s waiting for {what}; the screen's "
                                    f"status bar: {self.screen.text(0)!r}")
        finally:
            self.screen.on_frame = None

    def idle(self, seconds: float) -> None:
        """Keeps reading (the app must never block on a full terminal) for `seconds`."""
        deadline = time.perf_counter() + seconds
        while (left := deadline - time.perf_counter()) > 0:
            self.pump(left)

    def quit(self) -> None:
        """`q` as a user would (the worker checkpoints and stops), then waits for the process to end."""
        if self.process.poll() is None:
            try:
                os.write(self.master, b"q")
            except OSError:
                pass
            deadline = time.perf_counter() + QUIT_TIMEOUT_S
            while self.process.poll() is None and time.perf_counter() < deadline:
                try:
                    self.pump(0.1)
                except UserError:
                    break
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(OSError):
            os.close(self.master)

    def _exit_text(self) -> str:
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"exit code {code}"

    def _fail_if_dead(self) -> None:
        if self.process.poll() is not None:
            raise UserError(f"the UI exited early ({self._exit_text()}): {self.last_words()}")

    def last_words(self) -> str:
        """The last line of text the child wrote (a traceback's last line), without escape codes."""
        import pyte

        words = _Text()
        pyte.ByteStream(words, strict=False).feed(self.tail)
        text = "".join(words.parts)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "no output"


def _status(screen: TerminalScreen) -> tuple[int | None, float | None, str]:
    """(iteration, it/s, whole text) of the status bar, the screen's first row."""
    text = screen.text(0)
    iteration, rate = ITERATION.search(text), RATE.search(text)
    return (int(iteration[1]) if iteration else None, float(rate[1]) if rate else None, text)


def _dead_worker(screen: TerminalScreen) -> bool:
    return "worker died" in screen.text(0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_bench_ui(config, presses: int = DEFAULT_PRESSES, size: tuple[int, int] = DEFAULT_SIZE,
                 progress: Progress = quiet, seed: int | None = None) -> dict[str, Any]:
    """Runs the UI on a pseudo-terminal with a search on `config` and times `presses` key presses."""
    if presses < 1:
        raise UserError(f"--presses: must be >= 1, found {presses}")
    columns, rows = size
    rng = random.Random(seed)
    search = dataclasses.replace(config.search, iterations=SEARCH_ITERATIONS, time_budget="")  # runs to the end
    data = dataclasses.replace(config, search=search).to_dict()
    machine, cpu_start = report_machine(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="epo-bench-ui-") as folder:
        spec_path, info_path = Path(folder) / "spec.json", Path(folder) / "info.json"
        spec_path.write_text(json.dumps({"config": data, "source": config.source, "info": str(info_path)}),
                             encoding="utf-8")
        progress(f"starting the UI on a {columns}x{rows} pseudo-terminal ({config.source})")
        terminal = _Terminal(spec_path, columns, rows)
        session = None
        try:
            report = _measure(terminal, info_path, presses, rng, progress)
            session = report["session"]
        finally:
            terminal.quit()
            if session is None and info_path.is_file():
                session = json.loads(info_path.read_text(encoding="utf-8")).get("session")
            deleted = _delete_session(session)
    report.update(terminal={"columns": columns, "rows": rows,
                            "synchronized_output": terminal.replied and terminal.screen.frames > 0},
                  config=config.source, session_deleted=deleted,
                  terminal_cpu_s=time.process_time() - cpu_start,  # this process: the terminal's share
                  machine={**machine, "load_average_end": load_average()})
    latency = report["latency"]
    report["goals"] = [
        {"goal": "key press to repaint, p99 (s)", "target": f"< {GOALS['p99_s']}", "measured": latency["p99_s"],
         "met": latency["p99_s"] < GOALS["p99_s"]},
        {"goal": "first paint (s), before the worker is ready", "target": f"< {GOALS['first_paint_s']}",
         "measured": report["first_paint_s"],
         "met": report["first_paint_s"] < GOALS["first_paint_s"] and report["first_paint_before_ready"]},
    ]
    return report


def _measure(terminal: _Terminal, info_path: Path, presses: int, rng: random.Random,
             progress: Progress) -> dict[str, Any]:
    screen = terminal.screen
    first_paint = terminal.wait_for(lambda: bool(screen.text(0)), FIRST_PAINT_TIMEOUT_S, "the first screen")
    first_status = screen.text(0)
    progress(f"first paint after {first_paint - terminal.started:.2f} s: {first_status!r}; waiting for the worker")

    def ready() -> bool:
        if _dead_worker(screen):
            raise UserError(f"the worker died: {screen.text(0)}")
        return screen.text(0).startswith("ready")

    ready_at = terminal.wait_for(ready, READY_TIMEOUT_S, "the worker to load the model (status 'ready')")
    terminal.press(b"s")
    progress(f"ready after {ready_at - terminal.started:.2f} s; search started, waiting for its iterations")

    def running() -> bool:
        if _dead_worker(screen):
            raise UserError(f"the worker died: {screen.text(0)}")
        iteration = _status(screen)[0]
        return iteration is not None and iteration >= WARMUP_ITERATIONS and info_path.is_file()

    running_at = terminal.wait_for(running, READY_TIMEOUT_S, f"iteration {WARMUP_ITERATIONS} of the search")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    x, y, width, height = info["region"]
    home = y + info["cursor"] - info["scroll_y"]  # the highlighted row on screen
    if info["rows"] < 2 or height < 2 or not y <= home < y + height:
        raise UserError(f"the feature list shows {info['rows']} features in {height} rows: needs two to move in")
    away = home + 1 if home + 1 < y + height and info["cursor"] + 1 < info["rows"] else home - 1
    last = x + width - 1
    cursor_bg = screen.bg(home, last)
    if screen.bg(away, last) == cursor_bg:
        raise UserError("cannot tell the highlighted feature from the others on screen (same background)")

    def highlighted(row: int, other: int) -> Callable[[], bool]:
        return lambda: (screen.bg(row, x) == cursor_bg and screen.bg(row, last) == cursor_bg
                        and screen.bg(other, last) != cursor_bg)

    iteration_start, _, _ = _status(screen)
    measure_start = time.perf_counter()
    frames_start = screen.frames
    progress(f"search running (iteration {iteration_start}); pressing down/up {presses} times")
    latencies = []
    for n in range(presses):
        target, other = (away, home) if n % 2 == 0 else (home, away)
        if highlighted(target, other)():  # the screen must still show the last press, or we read it wrong
            raise UserError(f"key press {n + 1}: the highlight is on row {target} before the press")
        pressed = terminal.press(KEYS["down" if target > other else "up"])
        painted = terminal.wait_for(highlighted(target, other), PRESS_TIMEOUT_S, f"the repaint after key press {n + 1}")
        latencies.append(painted - pressed)
        terminal.idle(rng.uniform(*GAP_S))
    measure_end = time.perf_counter()
    iteration_end, rate, status_end = _status(screen)
    seconds = measure_end - measure_start
    iterations = (iteration_end or 0) - (iteration_start or 0)
    progress(f"done: {presses} presses in {seconds:.1f} s, the search ran {iterations} iterations meanwhile")
    return {
        "bench": "ui",
        "session": info["session"],
        "first_paint_s": first_paint - terminal.started,
        "first_paint_status": first_status,
        "first_paint_before_ready": not first_status.startswith("ready"),
        "ready_s": ready_at - terminal.started,
        "first_iterations_s": running_at - terminal.started,
        "keys": "down/up alternately in the feature list",
        "gap_s": list(GAP_S),
        "latency": {"count": len(latencies), "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
                    "max_s": max(latencies), "min_s": min(latencies), "mean_s": sum(latencies) / len(latencies)},
        "frames_during": screen.frames - frames_start,
        "search": {"seconds": seconds, "iteration_start": iteration_start, "iteration_end": iteration_end,
                   "iterations_during": iterations, "it_per_s": iterations / seconds if seconds > 0 else None,
                   "it_per_s_status": rate, "state_at_end": status_end.split(" · ")[0]},
    }


def _delete_session(session: str | None) -> bool:
    """The bench's session is no one's work: remove it (the worker has checkpointed it by now)."""
    if not session:
        return False
    from epo_tui import sessions

    try:
        sessions.delete_session(session, force=True)
    except (UserError, OSError):
        return False
    return True


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    out = console()
    m, t, lat, s = report["machine"], report["terminal"], report["latency"], report["search"]
    load = f", {load_text(m)}" if load_text(m) else ""
    out.print(Text(f"UI on a {t['columns']}x{t['rows']} pseudo-terminal "
                   f"({'synchronized output' if t['synchronized_output'] else 'unbracketed frames'}), "
                   f"{report['config']}; {m['cpu_count']} cores{load}"))
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("")
    table.add_column("measured", justify="right")
    table.add_row("first paint (process start)", f"{report['first_paint_s']:.2f} s")
    table.add_row("  it showed", Text(report["first_paint_status"]))
    table.add_row("worker ready", f"{report['ready_s']:.2f} s")
    table.add_row(f"search at iteration {WARMUP_ITERATIONS}", f"{report['first_iterations_s']:.2f} s")
    table.add_row("key presses (down/up, feature list)", f"{lat['count']}")
    table.add_row("key press to repaint p50", f"{lat['p50_s'] * 1000:.1f} ms")
    table.add_row("key press to repaint p99", f"{lat['p99_s'] * 1000:.1f} ms")
    table.add_row("key press to repaint max", f"{lat['max_s'] * 1000:.1f} ms")
    table.add_row("frames written meanwhile", f"{report['frames_during']}")
    table.add_row("CPU of the bench's terminal side", f"{report['terminal_cpu_s']:.2f} s")
    table.add_row("search meanwhile", f"{s['iterations_during']} iterations in {s['seconds']:.1f} s")
    rate = f"{s['it_per_s']:.2f}" if s["it_per_s"] is not None else "-"
    shown = f" (status bar {s['it_per_s_status']:.2f})" if s["it_per_s_status"] is not None else ""
    table.add_row("  it/s", f"{rate}{shown}")
    table.add_row("  state at the end", Text(s["state_at_end"]))
    out.print(table)
    print_goals(out, report["goals"])


# ----------------------------------------------------------------------------------------------
# The command line


def add_options(bench: argparse.ArgumentParser) -> None:
    """`--ui` and its options, on `epo-tui bench`."""
    group = bench.add_argument_group(
        "UI latency (--ui): the UI on a pseudo-terminal with a search running (--demo unless --config); "
        "key press to repaint, p50 and p99, and the time to the first screen")
    group.add_argument("--ui", action="store_true", help="measure the UI's latency instead of the search's speed")
    group.add_argument("--presses", type=int, metavar="N",
                       help=f"key presses to time (default {DEFAULT_PRESSES})")
    group.add_argument("--size", metavar="COLSxROWS",
                       help=f"the terminal's size (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise UserError(f"--size: expected COLUMNSxROWS like 120x36, found '{text}'")
    columns, rows = int(match[1]), int(match[2])
    if not (60 <= columns <= 1000 and 16 <= rows <= 500):
        raise UserError(f"--size: needs 60..1000 columns and 16..500 rows, found {columns}x{rows}")
    return columns, rows


def cmd_bench_ui(args: argparse.Namespace, config, progress: Progress = quiet) -> int:
    """`epo-tui bench --ui`: the config is the demo pack's unless --config was given."""
    from epo_tui import paths
    from epo_tui.config import load_config

    others = [flag for flag, value in (("--quality", args.quality), ("--model", args.model),
                                      ("--iterations", args.iterations), ("--heldout", args.heldout),
                                      ("--no-warm-start", args.no_warm_start)) if value]
    if others:
        raise UserError(f"--ui: measures the UI with a search on --config or --demo; drop {', '.join(others)}")
    presses = DEFAULT_PRESSES if args.presses is None else args.presses
    if presses < 1:
        raise UserError(f"--presses: must be >= 1, found {presses}")
    size = DEFAULT_SIZE if args.size is None else _parse_size(args.size)
    if not args.config:
        config = load_config(str(paths.demo_config_file()))
    report = run_bench_ui(config, presses=presses, size=size, progress=progress)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))

"""`epo-tui bench --ui`: the UI on a pseudo-terminal with a real worker searching on the tiny model.

No timing is asserted (this machine is shared): only that every press got its repaint, that the
figures are ordered and positive, and that the search kept running meanwhile. The terminal side's
frame detection is checked on its own, and the CLI's refusals are one line with exit code 2.
"""

from __future__ import annotations

import json

import pytest

from epo_tui import cli, sessions
from epo_tui.bench.ui_latency import SYNC_REPLY, TerminalScreen, percentile
from cli_run import run_cli


@pytest.mark.slow
def test_bench_ui_on_the_tiny_model(tiny_dir, capsys):
    code = cli.main(["bench", "--ui", "--config", str(tiny_dir / "config.toml"), "--presses", "10", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)  # stdout is one JSON object; progress went to stderr
    assert "pressing down/up 10 times" in out.err

    latency = report["latency"]
    assert latency["count"] == 10
    assert 0 < latency["min_s"] <= latency["p50_s"] <= latency["p99_s"] <= latency["max_s"]
    assert report["first_paint_s"] > 0
    assert report["first_paint_s"] <= report["ready_s"] <= report["first_iterations_s"]
    assert report["first_paint_before_ready"] and report["first_paint_status"]
    search = report["search"]
    assert search["iterations_during"] > 0 and search["it_per_s"] > 0
    assert search["state_at_end"] == "running"
    assert report["terminal"]["synchronized_output"]
    assert report["frames_during"] >= 10
    assert [goal["goal"] for goal in report["goals"]] == ["key press to repaint, p99 (s)",
                                                           "first paint (s), before the worker is ready"]
    assert report["session_deleted"]  # the bench leaves no session behind
    found, _ = sessions.list_sessions()
    assert report["session"] not in {entry.id for entry in found}


@pytest.mark.parametrize("argv, message", [
    (["--presses", "0"], "--presses: must be >= 1, found 0"),
    (["--presses", "-3"], "--presses: must be >= 1, found -3"),
    (["--presses", "many"], "invalid int value: 'many'"),
    (["--size", "wide"], "--size: expected COLUMNSxROWS"),
    (["--size", "20x5"], "--size: needs 60..1000 columns and 16..500 rows"),
    (["--quality"], "--ui: measures the UI with a search on --config or --demo; drop --quality"),
    (["--model", "tiny"], "drop --model"),
])
def test_bench_ui_refuses_bad_options_in_one_line(argv, message):
    code, out, err = run_cli("bench", "--ui", *argv)
    assert code == 2
    assert out == ""
    assert message in err
    assert err.count("\n") == 1


def test_frames_and_the_highlight_as_the_bench_reads_them():
    """The pieces the bench owns: frame marks found on raw bytes however the reads cut them, pyte fed
    up to each frame's end when the frame is counted, and the backgrounds the latency condition compares."""
    rgb = "\x1b[48;2;10;20;30m"
    first = f"\x1b[2;1H{rgb}  ★ f1  \x1b[0m\x1b[3;1H  f2    "  # the highlight on row 1 (truecolor)
    second = f"\x1b[2;1H\x1b[48;5;17m  ★ f1  \x1b[3;1H{rgb}  f2    \x1b[m"  # moved to row 2
    data = ("\x1b[?2026$p" + "\x1b[?2026h" + first + "\x1b[?2026l"
            + "\x1b[?2026h" + second + "\x1b[?2026l" + "\x1b[?2026h\x1b[1;1Hnext").encode()
    for reads in ([data], [data[i:i + 1] for i in range(len(data))],
                  [data[:5], data[5:14], data[14:40], data[40:]]):
        output = TerminalScreen(8, 4)
        seen = []

        def at_frame_end() -> None:
            seen.append((output.frames, output.text(1), output.text(2), output.text(0),
                         output.bg(1, 0), output.bg(1, 7), output.bg(2, 7)))

        output.on_frame = at_frame_end
        for chunk in reads:
            output.feed(chunk)
        assert output.sync_queried and output.frames == 2 and output.in_frame
        assert output.text(0) == "next"  # after the last frame end: pyte has everything
        # at each frame end the screen is that frame's, not the start of the next
        assert seen == [(1, "★ f1", "f2", "", "0a141e", "0a141e", "default"),
                        (2, "★ f1", "f2", "", "00005f", "00005f", "0a141e")]
    assert SYNC_REPLY == b"\x1b[?2026;2$y"  # what Textual's parser takes for "supported"


def test_percentile_is_a_measured_value():
    values = [0.5, 0.1, 0.3, 0.2, 0.4]
    assert percentile(values, 50) == 0.3
    assert percentile(values, 99) == 0.5
    assert percentile([0.7], 50) == percentile([0.7], 99) == 0.7

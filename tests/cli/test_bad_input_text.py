"""Issue 7 §1, bad texts and feature indices (`epo-tui score` and `run` on the tiny config), and random lines
on the worker's stdin: one clear line, exit code 2, nothing written; text reaches the terminal inert."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys

import pytest
from cli_run import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refusals import assert_refused, written_files

from epo_tui import protocol
from epo_tui.config import INT_MAX

NASTY = "\x1b[31mred\x1b]0;title\x07 \x9bcsi \u202eflip\u2028sep\x00nul\x7f [/] [bold]b\r\n\t"
SGR = re.compile(r"\x1b\[[0-9;]*m")  # colour codes: the only escapes score itself writes in a terminal
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> str:
    return str(tiny_dir / "config.toml")


# ----------------------------------------------------------------------------------------------
# Texts through `score`


@pytest.mark.parametrize("text, message", [
    pytest.param("", "the text to score is empty", id="empty"),
    pytest.param("word " * 400, "tokens with BOS and prefix; the model reads at most 128", id="past-n_ctx"),
    pytest.param("ok \udcc3( bad", "the text to score is not valid UTF-8 (at character 3)", id="bad-utf8"),
    pytest.param("\udcff\udcfe", "the text to score is not valid UTF-8 (at character 0)", id="only-bad-utf8"),
])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_score_refuses_empty_too_long_and_invalid_text(in_tmp, tiny, text, message, json_flag):
    before = written_files()
    assert_refused(*run_cli("score", "--config", tiny, *json_flag, text), message)
    assert written_files() == before


def test_text_at_the_context_limit_scores_and_one_more_word_is_refused(tiny, tiny_pair):
    """The limit is the model's context (n_ctx 128 for the tiny GPT-2): refused, never truncated."""
    words = 1
    while len(tiny_pair.model.encode(" ".join(["word"] * (words + 1)))) <= 128:
        words += 1
    code, out, err = run_cli("score", "--config", tiny, "--json", " ".join(["word"] * words))
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) <= 128
    code, out, err = run_cli("score", "--config", tiny, " ".join(["word"] * (words + 1)))
    assert_refused(code, out, err, "the model reads at most 128")


@pytest.mark.slow
def test_invalid_utf8_from_the_shell(in_tmp, tiny):
    """Real argv bytes (not UTF-8): the message names the problem, no traceback."""
    before = written_files()
    for raw in (b"\xff\xfe", b"ok \xc3\x28 bad"):
        proc = subprocess.run([sys.executable, "-m", "epo_tui", "score", "--config", tiny, raw],
                              capture_output=True, timeout=120, cwd=in_tmp)
        assert_refused(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), "not valid UTF-8")
    assert written_files() == before


def test_control_characters_reach_the_terminal_inert(tiny):
    code, out, err = run_cli("score", "--config", tiny, NASTY)
    assert code == 0, err
    assert not RAW_CONTROLS.search(out.replace("\n", "")), repr(out)
    assert "'\\x1b'" in out and "'\\x07'" in out and "'\\x00'" in out  # shown as escapes, not acted on


def test_control_characters_in_json_are_escaped(tiny):
    code, out, err = run_cli("score", "--config", tiny, "--json", NASTY)
    assert code == 0, err
    assert out.count("\n") == 1 and not RAW_CONTROLS.search(out[:-1]), repr(out)
    scored = json.loads(out)
    joined = "".join(scored["tokens"][1:])  # still the text's characters once parsed (multi-byte ones are
    assert all(c in joined for c in "\x1b\x07\x00\x7f\r\n\t[/]")  # split into byte tokens, shown as \xNN)
    assert bytes.fromhex("".join(scored["token_bytes"][1:])).decode() == NASTY  # and the bytes are all there


@pytest.mark.slow
def test_control_characters_in_a_coloured_terminal(tiny):
    """In a terminal the only escapes are score's own colour codes (SGR)."""
    env = {**os.environ, "FORCE_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "epo_tui", "score", "--config", tiny, NASTY.replace("\x00", "")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert SGR.search(proc.stdout)
    assert not RAW_CONTROLS.search(SGR.sub("", proc.stdout).replace("\n", "")), repr(proc.stdout)


def test_markup_in_tokens_is_printed_as_text(capsys):
    """A token like '[/]' is rich markup: it must neither crash the table nor style it."""
    from epo_tui.protocol import Scored
    from epo_tui.terminal import print_score

    print_score(Scored(feature=7, tokens=["<bos>", "[bold]x", "[/]", "[link=http://x]y"], token_bytes=[],
                       token_ids=[0, 1, 2, 3], activations=[0.0, 1.0, 3.0, 2.0], xent=[None, 1.0, 2.0, 3.0],
                       prompt_start=1))
    out = capsys.readouterr().out
    assert "'[bold]x'" in out and "'[/]'" in out and "'[link=http://x]y'" in out
    assert "max act 3.000 at pos 2 ('[/]')" in out


# ----------------------------------------------------------------------------------------------
# Feature indices and search options through `score` and `run`

SCORE_FEATURES = [
    (["--feature", "-1"], "--feature: must be >= 0, found -1"),
    (["--feature", "64"], "--feature: 64 is out of range for this SAE (0..63)"),
    (["--feature", str(10**9)], f"--feature: {10**9} is out of range"),
    (["--feature", str(10**30)], f"--feature: {10**30} is out of range"),
    (["--feature", "abc"], "argument --feature: invalid int value: 'abc'"),
    (["--feature", "1.5"], "invalid int value: '1.5'"),
    (["--feature", ""], "invalid int value: ''"),
    (["--feature", "\x1b[2J\n7"], "invalid int value: '\\x1b[2J\\n7'"),  # shown inert
]


@pytest.mark.parametrize("argv, message", SCORE_FEATURES)
def test_score_bad_feature(in_tmp, tiny, argv, message):
    before = written_files()
    assert_refused(*run_cli("score", "--config", tiny, *argv, "hello"), message)
    assert written_files() == before


RUN_OPTIONS = [
    *SCORE_FEATURES,
    (["--feature", "3", "--feature", "3"], "--feature: 3 is given twice"),
    (["--feature", "3", "--feature", "64"], "--feature: 64 is out of range"),
    (["--combine", "contrast"], "--combine contrast: needs two or more features"),
    (["--combine", "max"], "argument --combine: invalid choice: 'max'"),
    (["--iterations", "0"], "--iterations: must be >= 1, found 0"),
    (["--seed", "-5"], f"--seed: must be 0..{INT_MAX}, found -5"),
    (["--seed", str(2**64)], f"--seed: must be 0..{INT_MAX}, found {2**64}"),
]


@pytest.mark.parametrize("argv, message", RUN_OPTIONS)
def test_run_bad_feature_or_option_writes_nothing(in_tmp, tiny, argv, message):
    before = written_files()
    assert_refused(*run_cli("run", "--config", tiny, "--iterations", "1", *argv), message)
    assert written_files() == before  # no session, no ./epo-runs, no result files


def test_run_config_that_fails_at_set_up_writes_nothing(in_tmp, tiny_dir):
    """Errors found while setting up the search (hook, prompt length) still come first and alone."""
    before = written_files()
    for extra, message in [('[feature]\nindex = 0\nkind = "neuron"\nhook = "blocks.9.mlp.hook_post"\n',
                            "hook 'blocks.9.mlp.hook_post' is not in the model"),
                           ("[feature]\nindex = 0\n[search]\nprompt_tokens = 500\n",
                            "search.prompt_tokens: 500 tokens after a 1-token prefix exceed the model's 128")]:
        config = in_tmp / "c.toml"
        config.write_text(f'[model]\npath = "{tiny_dir / "model"}"\n[sae]\npath = "{tiny_dir / "sae"}"\n{extra}')
        assert_refused(*run_cli("run", "--config", config, "--iterations", "1"), message)
    assert written_files() - before <= {str(in_tmp / "c.toml")}


# ----------------------------------------------------------------------------------------------
# The worker's stdin: random lines, one worker for every example


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from worker_process import WorkerProcess

    w = WorkerProcess(tmp_path_factory.mktemp("fuzz"))
    w.expect("hello")
    yield w
    w.close()


RANDOM_LINES = st.one_of(
    st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\n", b"")).filter(lambda b: b.strip()),
    # well-formed JSON, never a command that could do something: score with random fields (no model is loaded)
    st.dictionaries(st.text(max_size=6), st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    max_size=4).map(lambda d: json.dumps({**d, "v": 1, "type": "score"}).encode()),
    st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=8), max_size=4).map(
        lambda d: json.dumps({"v": 1, **d}).encode()).filter(lambda b: b'"type"' not in b),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(line=RANDOM_LINES)
def test_random_lines_on_stdin_get_one_error_each_and_the_worker_keeps_serving(worker, line):
    worker.send_raw(line + b"\n")
    probe = f"probe-{len(worker.seen)}"
    worker.send("hello", id=probe)
    events = []
    while True:
        event = worker.events.get(timeout=60)
        assert event is not None, f"the worker exited after {line!r}"
        worker.seen.append(event)
        if event["type"] == "hello" and event.get("id") == probe:
            break
        events.append(event)
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1, (line, events)
    assert errors[0]["kind"] in ("protocol", "input") and "\n" not in errors[0]["message"]
    assert protocol.parse_event(json.dumps(errors[0]).encode())  # a valid event


def test_worker_fuzz_did_not_stop_the_worker(worker):
    worker.send("hello", id="last")
    assert worker.expect("hello", id="last")["pid"] == worker.proc.pid
    with pytest.raises(queue.Empty):
        worker.events.get(timeout=0.2)

"""`epo-tui run` and `epo-tui batch` on the tiny helper model: the files they write, their agreement
with `epo-tui score`, Ctrl-C, bad input, markdown safety, a batch split over two processes, and batch
reruns that continue where a stopped or killed batch left off."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from epo_tui import protocol, results
from epo_tui.engine import distributed
from epo_tui.errors import UserError
from cli_run import run_cli

ITERATIONS = 8


def _feature(tiny_dir: Path) -> int:
    import tomli

    return tomli.loads((tiny_dir / "config.toml").read_text())["feature"]["index"]


def _config(tiny_dir: Path) -> str:
    return str(tiny_dir / "config.toml")


def _load(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    code, stdout, stderr = run_cli("run", "--config", _config(tiny_dir), "--iterations", ITERATIONS, "--out", out)
    assert code == 0, stderr
    assert stdout.startswith(f"ran {ITERATIONS}/{ITERATIONS} iterations") and f"results in {out}/" in stdout
    (out.parent / "stderr.txt").write_text(stderr)
    (out.parent / "stdout.txt").write_text(stdout)
    return out


# ----------------------------------------------------------------------------------------------
# run


def test_run_writes_result_json_with_the_documented_keys(run_dir, tiny_dir):
    result = _load(run_dir)
    assert result["version"] == 1
    assert set(result) >= {"config", "feature", "model", "sae", "timings", "frontier", "best_objective_history",
                           "elites"}
    assert result["config"]["search"]["iterations"] == ITERATIONS
    assert result["feature"] == {"kind": "sae", "indices": [_feature(tiny_dir)], "combine": "lp", "lp_p": 0.1,
                                 "lp_offset": 4.0, "read": "last", "hook": "blocks.1.hook_resid_pre"}
    assert result["model"] == str(tiny_dir / "model")
    assert result["sae"] == {"name": str(tiny_dir / "sae"), "hook": "blocks.1.hook_resid_pre"}
    timings = result["timings"]
    assert timings["iterations_run"] == timings["iterations_requested"] == ITERATIONS
    assert timings["interrupted"] is False
    assert timings["first_iteration_s"] > 0 and timings["per_iteration_s"] > 0
    assert timings["total_s"] >= timings["first_iteration_s"] + timings["per_iteration_s"] * (ITERATIONS - 1) - 1e-6
    assert len(result["best_objective_history"]) == ITERATIONS
    assert result["frontier"] and all({"xent", "objective", "act", "token_ids", "text"} <= set(p)
                                      for p in result["frontier"])
    elites = result["elites"]
    assert len(elites) == result["config"]["search"]["elites"]
    for elite in elites:
        protocol.Elite.from_json(elite)  # every field there, each of its type
        n = len(elite["token_ids"])
        assert len(elite["tokens"]) == len(elite["activations"]) == n


def test_run_shows_the_starting_elites_before_the_first_iteration(run_dir):
    """The first iteration compiles: the starting elites are shown as soon as they exist."""
    lines = (run_dir.parent / "stderr.txt").read_text().splitlines()
    starting = [i for i, line in enumerate(lines) if "starting elites (iteration 0)" in line]
    first = [i for i, line in enumerate(lines) if f"iteration 1/{ITERATIONS}" in line]
    assert len(starting) == 1 and first and starting[0] < first[0], lines
    elites = _load(run_dir)["config"]["search"]["elites"]
    assert re.search(rf": {elites} starting elites \(iteration 0\) · best act -?\d+\.\d{{3}} at xent \d+\.\d{{3}}: \".+\"$",
                     lines[starting[0]]), lines[starting[0]]


def test_run_says_what_lambda_means_in_the_log_the_report_and_result_json(run_dir):
    """The tiny model's SAE has no dataset statistics: λ is priced in a scale the search measured."""
    scale = _load(run_dir)["penalty_scale"]
    assert scale["source"] == "measured" and scale["value"] > 0 and scale["features"] == []
    assert scale["nat_at_lambda_1"] == pytest.approx(scale["value"] / 10)
    assert scale["description"] == (f"λ = 1 prices a nat at {scale['value'] / 10:.3g} (a tenth of 3 standard "
                                    f"deviations of the feature over the model's own text, {scale['value']:.3g})")
    lines = (run_dir.parent / "stderr.txt").read_text().splitlines()
    assert f"epo-tui: feature {_load(run_dir)['feature']['indices'][0]}: {scale['description']}" in lines
    assert f"\nFluency penalty: {results.md_text(scale['description'])}.\n" in (run_dir / "report.md").read_text()


def test_the_best_act_shown_is_the_highest_the_search_found(run_dir):
    """Not the best elite's: the elite of the lowest λ trades act for xent, the frontier keeps the highest."""
    result = _load(run_dir)
    top = max(result["frontier"], key=lambda p: p["act"])
    assert top["act"] >= max(e["act"] for e in result["elites"])
    assert f"; best act {top['act']:.3f} (xent {top['xent']:.3f}); " in (run_dir.parent / "stdout.txt").read_text()
    last = [line for line in (run_dir.parent / "stderr.txt").read_text().splitlines()
            if f"iteration {ITERATIONS}/{ITERATIONS}" in line][-1]
    lowest = min(p["xent"] for p in result["frontier"])
    assert f" · best act {top['act']:.3f} · best xent {lowest:.3f}" in last


def test_run_writes_a_readable_report(run_dir):
    report = (run_dir / "report.md").read_text()
    result = _load(run_dir)
    assert report.startswith(f"# EPO: feature {result['feature']['indices'][0]}\n")
    assert "| # | λ | act | xent | prompt |" in report
    assert report.count("<details>") == len(result["elites"]) == report.count("</details>")
    assert "## Frontier" in report and f"{ITERATIONS} of {ITERATIONS} iterations" in report


def test_elites_agree_with_score(run_dir, tiny_dir):
    result = _load(run_dir)
    feature = result["feature"]["indices"][0]
    for elite in result["elites"]:
        code, out, err = run_cli("score", "--config", _config(tiny_dir), "--feature", feature, "--json", elite["text"])
        assert code == 0, err
        scored = json.loads(out)
        assert scored["token_ids"] == elite["token_ids"]
        assert abs(scored["activations"][-1] - elite["act"]) < 1e-4
        optimized = scored["xent"][elite["prompt_start"]:]
        assert abs(sum(optimized) / len(optimized) - elite["xent"]) < 1e-4
        np.testing.assert_allclose(elite["activations"], scored["activations"], atol=1e-4)


def test_two_features_combined_by_lp(tiny_dir, tmp_path):
    first = _feature(tiny_dir)
    second = 0 if first else 1
    out = tmp_path / "two"
    code, stdout, err = run_cli("run", "--config", _config(tiny_dir), "--feature", first, "--feature", second,
                             "--combine", "lp", "--iterations", 3, "--out", out)
    assert code == 0, err
    result = _load(out)
    assert result["feature"]["indices"] == [first, second] and result["feature"]["combine"] == "lp"
    assert result["config"]["feature"]["indices"] == [first, second]
    elite = result["elites"][0]
    assert set(elite["feature_activations"]) == {str(first), str(second)}
    assert f"# EPO: features {first}, {second} combined by lp" in (out / "report.md").read_text()


def _interrupt_step_at(monkeypatch, iteration: int, feature: int | None = None) -> None:
    """Search.step raises KeyboardInterrupt (as Ctrl-C would) when it starts `iteration`."""
    from epo_tui.engine.search import Search

    real_step = Search.step

    def step(self, state):
        if state.iteration == iteration and feature in (None, self.config.feature.index):
            raise KeyboardInterrupt
        return real_step(self, state)

    monkeypatch.setattr(Search, "step", step)


def test_ctrl_c_stops_between_iterations_and_still_writes_results(tiny_dir, tmp_path, monkeypatch):
    _interrupt_step_at(monkeypatch, 3)
    out = tmp_path / "stopped"
    code, stdout, _ = run_cli("run", "--config", _config(tiny_dir), "--iterations", ITERATIONS, "--out", out)
    assert code == 130  # interrupted, results saved: documented in README and --help
    assert stdout.startswith(f"interrupted after 3/{ITERATIONS} iterations") and str(out) in stdout
    timings = _load(out)["timings"]
    assert timings["iterations_run"] == 3 and timings["interrupted"] is True
    assert f"Interrupted after 3 of {ITERATIONS} iterations" in (out / "report.md").read_text()


@pytest.mark.slow
def test_sigint_on_a_running_search_writes_results(tiny_dir, tmp_path):
    out = tmp_path / "sigint"
    proc = subprocess.Popen([sys.executable, "-m", "epo_tui", "run", "--config", _config(tiny_dir),
                             "--iterations", "1000000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # progress lines: stderr is a pipe here
            if "iteration 1/" in line:
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "stopping after this iteration" in stderr and stdout.startswith("interrupted after ")
    timings = _load(out)["timings"]
    assert timings["interrupted"] is True and 1 <= timings["iterations_run"] < 1000000


@pytest.mark.parametrize("argv, message", [
    (["run", "--iterations", "0"], "epo-tui: error: --iterations: must be >= 1, found 0"),
    (["run", "--feature", "-1"], "epo-tui: error: --feature: must be >= 0, found -1"),
    (["run", "--feature", "99"], "epo-tui: error: --feature: 99 is out of range for this SAE (0..63)"),
    (["run", "--feature", "3", "--feature", "3"], "epo-tui: error: --feature: 3 is given twice"),
    (["run", "--combine", "max"], "argument --combine: invalid choice: 'max'"),
    (["run", "--combine", "contrast"], "--combine contrast: needs two or more features"),
    (["batch", "--features", "1,x"], "argument --features: expected feature indices like 1,2,3, found '1,x'"),
    (["batch", "--features", "1,2,1"], "argument --features: feature 1 is listed twice"),
    (["batch", "--features", "1,99"], "epo-tui: error: --features: 99 is out of range for this SAE (0..63)"),
    (["batch", "--random", "0"], "epo-tui: error: --random: must be >= 1, found 0"),
    (["batch", "--random", "65"], "epo-tui: error: --random: 65 features asked, the SAE has 64"),
    (["batch"], "one of the arguments --features --random is required"),
    (["batch", "--features", "1", "--coordinator", "127.0.0.1:1"],
     "epo-tui: error: --coordinator, --num-processes, --process-id go together; missing --num-processes, "
     "--process-id"),
    (["batch", "--features", "1", "--coordinator", "x", "--num-processes", "2", "--process-id", "0"],
     "epo-tui: error: --coordinator: expected HOST:PORT, found 'x'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, argv, message):
    code, out, err = run_cli(*argv[:1], "--config", _config(tiny_dir), *argv[1:], "--out", tmp_path / "never")
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_an_out_that_cannot_hold_results_is_refused_and_earlier_results_are_kept(tiny_dir, tmp_path):
    a_file, earlier, notes = tmp_path / "a-file", tmp_path / "earlier", tmp_path / "notes"
    a_file.write_text("not a folder")
    earlier.mkdir()
    (earlier / "result.json").write_text('{"kept": true}')
    notes.mkdir()
    (notes / "report.md").write_text("mine")
    for argv, message in ((["run", "--out", a_file], f"--out {a_file}: is a file, not a folder"),
                          (["run", "--out", a_file / "sub"], f"--out {a_file / 'sub'}: {a_file} is a file, not a folder"),
                          (["batch", "--features", "1", "--out", a_file / "b"], f"--out {a_file / 'b'}: {a_file} is a file, not a folder"),
                          (["run", "--out", earlier], f"--out {earlier}: holds result.json already, which a run "
                                                      "would overwrite; give another folder"),
                          (["run", "--out", notes], f"--out {notes}: holds report.md already, which a run would "
                                                    "overwrite; give another folder")):
        code, out, err = run_cli(*argv[:1], "--config", _config(tiny_dir), *argv[1:])
        assert (code, out, err) == (2, "", f"epo-tui: error: {message}\n")
    assert a_file.read_text() == "not a folder" and (earlier / "result.json").read_text() == '{"kept": true}'
    assert (notes / "report.md").read_text() == "mine"


def test_a_reader_that_left_the_pipe_ends_the_command_quietly(tmp_path):
    """`epo-tui sessions | head -1`: once head has gone, the rest of the output goes nowhere, with no
    "internal error" and the exit code a shell gives a writer its reader left (141)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-m", "epo_tui", "sessions", "list"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


# ----------------------------------------------------------------------------------------------
# Markdown safety

HOSTILE = ["<script>alert(1)</script>", " |", "`x`", "**b**", "[a](http://e.vil)", "\n# head", "</details>",
           "_i_", "&amp;", "\x1b[31m", "![i](x.png)", "<img src=x onerror=alert(1)>", "\\", "  ", "\u202e", "~~s~~"]


def _hostile_result() -> dict:
    tokens = ["<|endoftext|>", *HOSTILE]
    acts = [0.0] + [1.5 if i % 2 else 0.0 for i in range(len(HOSTILE))]
    elite = protocol.Elite(penalty=1.0, token_ids=list(range(len(tokens))), tokens=tokens, activations=acts,
                           act=1.5, xent=3.0, objective=-1.5, prompt_start=1, text="".join(HOSTILE),
                           feature_activations={"1": acts, "2": acts})
    feature = protocol.OptimizedFeature(kind="sae", indices=[1, 2], combine="lp", lp_p=0.1, lp_offset=4.0, read="last",
                                        hook="blocks.0.hook_resid_pre")
    config = {"search": {"seed": 0, "elites": 2, "candidates": 4, "prompt_tokens": len(HOSTILE)}}
    return results.build_result(
        config=config, feature=feature, model="evil`|<b>model", sae={"name": "<i>sae</i>", "hook": "x|y"},
        timings=results.RunTimings(iterations_requested=5, setup_s=0.1, iteration_s=[1.0, 0.5], interrupted=True),
        frontier=[{"xent": 3.0, "objective": 1.5, "act": 1.5, "token_ids": [1], "text": "".join(HOSTILE)}],
        best_objective_history=[1.5, 1.5], elites=[elite, elite])


def _html(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").render(markdown)


def _assert_tables_are_rectangular(html: str) -> None:
    for table in re.findall(r"<table>.*?</table>", html, re.S):
        widths = {len(re.findall(r"<t[hd]\b", row)) for row in re.findall(r"<tr>.*?</tr>", table, re.S)}
        assert len(widths) == 1, table


def test_report_cannot_be_injected_by_tokens():
    result = _hostile_result()
    markdown = results.render_report(result)
    assert "\x1b" not in markdown and "\u202e" not in markdown
    html = _html(markdown)
    for raw in ("<script", "<img", "<a ", "<em>", "<strong>", "<del>", "<i>"):
        assert raw not in html, raw
    assert html.count("<h1>") == 1 and html.count("<h2>") == 2 and html.count("<h3>") == 2
    assert html.count("</details>") == 2 and html.count("<details>") == 2
    assert html.count("<b>") == 2 * sum(1 for i, t in enumerate(HOSTILE) if i % 2 and t.strip())
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "[a](http://e.vil)" in html
    _assert_tables_are_rectangular(html)
    table_rows = html.split("<h2>Frontier</h2>")[1]
    assert len(re.findall(r"<tr>", table_rows)) == 2


def test_index_cannot_be_injected_by_prompts():
    entry = {"feature": 3, "act": 1.0, "xent": 2.0, "prompt": "".join(HOSTILE), "token_ids": [1],
             "iterations_run": 2, "interrupted": True, "process_id": 0, "folder": "feature-3"}
    index = results.build_index([entry], model="m|<b>", sae={"name": "s", "hook": "h"}, features_requested=[3, 4],
                                interrupted=True, process={"id": 0, "count": 1})
    html = _html(results.render_index(index))
    assert "<script" not in html and "<img" not in html and "<strong>" not in html
    assert html.count("<a ") == 1 and 'href="feature-3/report.md"' in html
    assert "features not run: 4" in html
    _assert_tables_are_rectangular(html)


def test_md_text_escapes_every_markup_character():
    assert results.md_text("a|b") == "a\\|b"
    assert results.md_text("<b>*x*</b>") == "&lt;b&gt;\\*x\\*&lt;\\/b&gt;"
    assert results.md_text("`[x](y)`") == "\\`\\[x\\]\\(y\\)\\`"
    assert results.md_text("line\nbreak") == "line\\\\nbreak"
    assert results.md_token(" the") == "␣the" and results.md_token("") == "∅"


def test_results_module_imports_no_heavy_library():
    code = ("import sys, json, epo_tui.results; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('jax', 'torch', 'transformers', 'sae_lens'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == []


# ----------------------------------------------------------------------------------------------
# batch


def _compiled_counts() -> tuple[int, ...]:
    from epo_tui.engine import evaluation, reporting, sampling, search

    jitted = (search.gradients, search.propose, sampling.sample_continuations, reporting._whole_prompt_activations)
    # one whole-prompt evaluator per search statics: a feature changes none of them (its suffix
    # evaluators are keyed by the same statics, one per start)
    return (*(f.cache_size() for f in jitted), evaluation.full_evaluator.cache_info().currsize)


def test_batch_writes_folders_and_an_index_sorted_by_activation(tiny_dir, tmp_path, monkeypatch):
    import epo_tui.engine.pairing as pairing

    loads = []
    real_load = pairing.load_model_with_sae
    monkeypatch.setattr(pairing, "load_model_with_sae", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    features = [_feature(tiny_dir), 2, 11, 3]
    run_cli("run", "--config", _config(tiny_dir), "--iterations", 1, "--out", tmp_path / "warm")  # compile once
    before = _compiled_counts()
    out = tmp_path / "batch"
    code, stdout, err = run_cli("batch", "--config", _config(tiny_dir), "--features", ",".join(map(str, features)),
                             "--iterations", 3, "--out", out)
    assert code == 0, err
    assert _compiled_counts() == before, "a feature recompiled the search steps"
    assert len(loads) == 2  # the warm-up run and the whole batch
    index = json.loads((out / "index.json").read_text())
    assert sorted(e["feature"] for e in index["features"]) == sorted(features)
    acts = [e["act"] for e in index["features"]]
    assert acts == sorted(acts, reverse=True) and index["features_missing"] == [] and not index["interrupted"]
    for entry in index["features"]:
        result = _load(out / entry["folder"])
        best = results.best_elite(result)
        assert entry["folder"] == f"feature-{entry['feature']}" and result["feature"]["indices"] == [entry["feature"]]
        assert abs(entry["act"] - best["act"]) < 1e-6 and abs(entry["xent"] - best["xent"]) < 1e-6
        assert entry["token_ids"] == best["token_ids"][best["prompt_start"]:] and entry["prompt"] == best["text"]
        assert (out / entry["folder"] / "report.md").is_file()
    index_md = (out / "index.md").read_text()
    rows = [line for line in index_md.splitlines() if line.startswith("| ") and "/report.md)" in line]
    assert [int(r.split("|")[1]) for r in rows] == [e["feature"] for e in index["features"]]
    best = index["features"][0]
    assert stdout.startswith("ran 4/4 features") and f"best feature {best['feature']}" in stdout


def test_batch_random_draws_distinct_features_deterministically(tiny_dir, tmp_path):
    from epo_tui.engine.runner import random_features

    drawn = random_features(3, 64, seed=5)
    assert drawn == random_features(3, 64, seed=5) and len(set(drawn)) == 3 and all(0 <= f < 64 for f in drawn)
    assert any(random_features(3, 64, seed=s) != drawn for s in range(6, 10))
    out = tmp_path / "random"
    code, _, err = run_cli("batch", "--config", _config(tiny_dir), "--random", 3, "--seed", 5, "--iterations", 2,
                        "--out", out)
    assert code == 0, err
    index = json.loads((out / "index.json").read_text())
    assert index["features_requested"] == drawn
    assert sorted(e["feature"] for e in index["features"]) == drawn
    assert all(_load(out / f"feature-{f}")["config"]["search"]["seed"] == 5 for f in drawn)


def test_batch_ctrl_c_writes_what_finished_and_the_index(tiny_dir, tmp_path, monkeypatch):
    features = [1, 2, 3]
    _interrupt_step_at(monkeypatch, 2, feature=2)
    out = tmp_path / "stopped"
    code, stdout, _ = run_cli("batch", "--config", _config(tiny_dir), "--features", "1,2,3", "--iterations", 4,
                           "--out", out)
    assert code == 130 and stdout.startswith("interrupted: 2/3 features")
    index = json.loads((out / "index.json").read_text())
    assert index["interrupted"] and index["features_missing"] == [3]
    by_feature = {e["feature"]: e for e in index["features"]}
    assert set(by_feature) == {1, 2}
    assert by_feature[2]["interrupted"] and by_feature[2]["iterations_run"] == 2
    assert not by_feature[1]["interrupted"] and by_feature[1]["iterations_run"] == 4
    assert not (out / "feature-3").exists() and features[:2] == sorted(by_feature)
    assert "features not run: 3" in (out / "index.md").read_text()

    # the same command again continues: feature 1 is kept, 2 (stopped) and 3 (never started) run
    monkeypatch.undo()
    kept = (out / "feature-1" / "result.json").read_bytes()
    code, stdout, err = run_cli("batch", "--config", _config(tiny_dir), "--features", "1,2,3", "--iterations", 4,
                                "--out", out)
    assert code == 0 and stdout.startswith("ran 3/3 features"), err
    assert f"already done in {out}/, not run again: features 1\n" in err
    assert (out / "feature-1" / "result.json").read_bytes() == kept
    index = json.loads((out / "index.json").read_text())
    assert sorted(e["feature"] for e in index["features"]) == features and not index["interrupted"]
    assert all(e["iterations_run"] == 4 and not e["interrupted"] for e in index["features"])


def _batch_summaries(out: Path) -> dict[int, dict]:
    return {e["feature"]: e for e in json.loads((out / "index.json").read_text())["features"]}


def test_batch_rerun_runs_only_missing_and_half_written_features(tiny_dir, tmp_path, monkeypatch):
    from epo_tui.engine import runner

    out = tmp_path / "again"
    same = ("batch", "--config", _config(tiny_dir), "--iterations", 2, "--out", out)
    code, _, err = run_cli(*same, "--features", "1,2,3")
    assert code == 0, err
    first = _batch_summaries(out)
    kept = {f: (out / f"feature-{f}" / "result.json").read_bytes() for f in (1, 2)}
    # feature 3 as a process killed inside write_result leaves it: report.md written, result.json only
    # a temp file (result.json is written last, atomically); then no index
    (out / "feature-3" / "result.json").rename(out / "feature-3" / ".result.json.k1ll3d.tmp")
    (out / "index.json").unlink()
    (out / "index.md").unlink()
    ran = []
    real_run_one = runner.run_one
    monkeypatch.setattr(runner, "run_one", lambda pair, config, *a, **k: ran.append(config.feature.index)
                        or real_run_one(pair, config, *a, **k))

    code, stdout, err = run_cli(*same, "--features", "1,2,3,4")
    assert code == 0 and stdout.startswith("ran 4/4 features"), err
    assert ran == [3, 4]
    assert [line for line in err.splitlines() if "already done" in line] == [
        f"epo-tui: batch: already done in {out}/, not run again: features 1, 2"]
    assert all((out / f"feature-{f}" / "result.json").read_bytes() == kept[f] for f in kept)
    assert sorted(p.name for p in out.iterdir()) == ["feature-1", "feature-2", "feature-3", "feature-4",
                                                     "index.json", "index.md"]
    assert sorted(p.name for p in (out / "feature-3").iterdir()) == ["report.md", "result.json"]
    index = json.loads((out / "index.json").read_text())
    assert [e["feature"] for e in index["features"]].count(1) == 1
    assert sorted(e["feature"] for e in index["features"]) == [1, 2, 3, 4] and index["features_missing"] == []
    again = _batch_summaries(out)
    assert all(again[f] == first[f] for f in (1, 2)), "a kept feature's line changed"
    for f in (3, 4):
        best = results.best_elite(_load(out / f"feature-{f}"))
        assert again[f]["act"] == pytest.approx(best["act"], abs=1e-6) and again[f]["prompt"] == best["text"]

    # another config never mixes into the same folder: one line, exit 2, nothing run or written
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for flag, there, now in (("--iterations", 2, 3), ("--seed", 0, 7)):
        argv = [*same, "--features", "1,2,3,4", flag, now]
        code, stdout, err = run_cli(*argv)
        key = "search.iterations" if flag == "--iterations" else "search.seed"
        assert code == 2 and stdout == "" and err.count("\n") == 1, err
        assert err.startswith(f"epo-tui: error: --out {out}: holds results of another config (feature-1: "
                              f"{key} {there} there, {now} now); "), err
    assert ran == [3, 4] and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# ----------------------------------------------------------------------------------------------
# Several processes


def test_launch_spec_from_flags_and_environment():
    spec = distributed.launch_spec("10.0.0.1:1234", 2, 1, environ={})
    assert spec == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert distributed.launch_spec(None, None, None, environ={}) is None
    assert distributed.launch_spec("h:1", 1, 0, environ={}) is None  # one process: nothing to set up
    env = {"JAX_COORDINATOR_ADDRESS": "h:5", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.launch_spec(None, None, None, environ=env) == {
        "coordinator_address": "h:5", "num_processes": 4, "process_id": 3}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert distributed.launch_spec(None, None, None, environ=slurm) == distributed.AUTO
    assert distributed.launch_spec(None, None, None, environ={**slurm, "SLURM_NTASKS": "1"}) is None
    assert distributed.launch_spec(None, None, None, environ={"OMPI_MCA_orte_hnp_uri": "x",
                                                              "OMPI_COMM_WORLD_SIZE": "3"}) == distributed.AUTO
    assert distributed.launch_spec(None, None, None, environ={"TPU_WORKER_HOSTNAMES": "a,b"}) == distributed.AUTO
    assert distributed.launch_spec(None, None, None, auto=True, environ={}) == distributed.AUTO
    with pytest.raises(UserError, match="JAX_PROCESS_ID: expected an integer"):
        distributed.launch_spec(None, None, None, environ={"JAX_COORDINATOR_ADDRESS": "h:5", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(UserError, match=r"--process-id: must be in 0\.\.1, found 2"):
        distributed.launch_spec("h:1", 2, 2, environ={})


def test_processes_share_features_and_summaries_survive_packing():
    clusters = [distributed.Cluster(i, 3) for i in range(3)]
    assert [c.share([5, 6, 7, 8, 9]) for c in clusters] == [[5, 8], [6, 9], [7]]
    summaries = [{"feature": 7, "act": 1.5, "xent": 2.25, "token_ids": [4, 5], "iterations_run": 3,
                  "interrupted": True, "process_id": 2}]
    rows = distributed.rows_per_process(5, clusters[2])
    assert distributed.gather_summaries(summaries, distributed.Cluster(), rows, prompt_tokens=4) == summaries


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_two(tiny_dir: Path, features: list[int], out: Path, iterations: int) -> list[subprocess.Popen]:
    """The same `batch` command as processes 0 and 1 of two, on a fresh local coordinator port."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "epo_tui", "batch", "--config", _config(tiny_dir),
                              "--features", ",".join(map(str, features)), "--iterations", str(iterations),
                              "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
            for i in range(2)]


def _finish_two(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    """(stdout, stderr) of both processes, each of which must exit 0."""
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-2000:]
    return outputs


@pytest.mark.slow
def test_batch_over_two_processes(tiny_dir, tmp_path):
    feature = _feature(tiny_dir)
    features = [feature] + [i for i in range(10) if i != feature][:3]
    out = tmp_path / "two"
    procs = _start_two(tiny_dir, features, out, iterations=3)
    outputs = _finish_two(procs)
    assert "process 1/2: ran features" in outputs[1][0] and "process 0 writes the index" in outputs[1][0]
    for position, f in enumerate(features):
        result = _load(out / f"feature-{f}")
        assert result["process"] == {"id": position % 2, "count": 2}, f
        assert result["timings"]["iterations_run"] == 3
    index = json.loads((out / "index.json").read_text())
    assert index["written_by"] == {"id": 0, "count": 2}
    assert sorted(e["feature"] for e in index["features"]) == sorted(features)
    acts = [e["act"] for e in index["features"]]
    assert acts == sorted(acts, reverse=True)
    for entry in index["features"]:
        best = results.best_elite(_load(out / entry["folder"]))
        assert entry["process_id"] == features.index(entry["feature"]) % 2
        assert abs(entry["act"] - best["act"]) < 1e-6 and entry["prompt"] == best["text"]



@pytest.mark.slow
def test_batch_over_two_processes_continues_after_one_dies(tiny_dir, tmp_path):
    features, iterations = [0, 1, 2, 3, 4, 5], 60  # a feature takes long enough to be killed in
    out = tmp_path / "killed"
    ones = [f for position, f in enumerate(features) if position % 2 == 1]  # process 1's share
    procs = _start_two(tiny_dir, features, out, iterations)
    try:
        # process 1 dies as a host would (SIGKILL) once one of its features is whole, before its last
        deadline = time.monotonic() + 300
        while not (out / f"feature-{ones[0]}" / "result.json").exists():
            assert procs[1].poll() is None and time.monotonic() < deadline, procs[1].communicate()[1][-2000:]
            time.sleep(0.02)
        procs[1].kill()
        procs[1].wait()
        procs[0].kill()  # what jax does to it after its heartbeat timeout (about 100 s), sooner
        procs[0].wait()
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    whole = {f for f in features if (out / f"feature-{f}" / "result.json").exists()}
    assert ones[0] in whole and not set(ones) <= whole and not (out / "index.json").exists()
    kept = {f: (out / f"feature-{f}" / "result.json").read_bytes() for f in whole}

    procs = _start_two(tiny_dir, features, out, iterations)
    outputs = _finish_two(procs)
    skipped = [line for _, stderr in outputs for line in stderr.splitlines() if "already done" in line]
    assert sorted(int(f) for line in skipped for f in line.rsplit("features ", 1)[1].split(", ")) == sorted(whole)
    assert all((out / f"feature-{f}" / "result.json").read_bytes() == kept[f] for f in whole)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"feature-{f}" for f in features] +
                                                           ["index.json", "index.md"])
    index = json.loads((out / "index.json").read_text())
    assert sorted(e["feature"] for e in index["features"]) == features  # each exactly once
    assert index["features_missing"] == [] and not index["interrupted"]
    for entry in index["features"]:
        assert sorted(p.name for p in (out / entry["folder"]).iterdir()) == ["report.md", "result.json"]
        result = _load(out / entry["folder"])
        assert result["timings"]["iterations_run"] == iterations and not result["timings"]["interrupted"]
        assert result["process"]["id"] == features.index(entry["feature"]) % 2 == entry["process_id"]
        assert entry["act"] == pytest.approx(results.best_elite(result)["act"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# against the SAE's dataset statistics


@pytest.mark.slow
def test_run_and_batch_compare_every_elite_with_the_dataset_maximum(tiny_dir, tmp_path, monkeypatch):
    from epo_tui import dataset_stats

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    # the statistics written below must not change the searches (penalty_scale "auto" would price λ in
    # their maxima): both batches run the same searches, and only what they report differs
    config = tiny_dir / "config-measured-scale.toml"
    config.write_text((tiny_dir / "config.toml").read_text().replace(
        "[search]\n", '[search]\npenalty_scale = "measured"\n', 1))
    code, _, err = run_cli("batch", "--config", config, "--features", "1,2,3", "--iterations", 2,
                           "--out", tmp_path / "before")
    assert code == 0, err
    first = _load(tmp_path / "before" / "feature-1")
    assert "dataset" not in first  # no statistics yet
    acts = {f: _load(tmp_path / "before" / f"feature-{f}")["elites"] for f in (1, 2, 3)}
    best = {f: max(e["act"] for e in elites) for f, elites in acts.items()}
    d_sae = 1 + max(best)  # only latents 1..3 matter: the store's F need not be the SAE's
    max_F = np.full(d_sae, np.nan)
    assert best[2] > 0  # the tiny model's latent 2 fires within 2 iterations (1 and 3 do not)
    max_F[1], max_F[2] = 0.5, best[2] / 2  # feature 2's best is 2x its maximum, 1's is 0x; 3's unknown
    dataset_stats.write_stats(dataset_stats.stats_folder(dataset_stats.sae_key(first["model"], first["sae"]["name"]),
                                                         dataset_stats.LOCAL),
                              max_F, np.full(d_sae, np.nan), [], provenance={"origin": "local"})

    code, _, err = run_cli("batch", "--config", config, "--features", "1,2,3", "--iterations", 2,
                           "--out", tmp_path / "after")
    assert code == 0, err
    index = json.loads((tmp_path / "after" / "index.json").read_text())
    assert [(e["feature"], e["dataset_ratio"]) for e in index["features"]] == [
        (2, pytest.approx(2.0)), (1, 0.0), (3, None)]
    two = _load(tmp_path / "after" / "feature-2")
    assert two["dataset"]["ratios"] == pytest.approx([e["act"] / max_F[2] for e in two["elites"]])
    assert "the best elite reaches 2.00× it" in (tmp_path / "after" / "feature-2" / "report.md").read_text()
    assert "dataset" not in _load(tmp_path / "after" / "feature-3")
    assert "| 2 | " in (tmp_path / "after" / "index.md").read_text().split("× dataset max")[1]

"""The time budget (`--time-budget`, `search.time_budget`): what it accepts, and `run`, `batch`, `bench
--quality`, `run --resume` and the worker stopping at it between iterations with whole results, exit
code 0 and "the budget ran out" (not "interrupted"). A fake clock advances a fixed time per iteration,
so every count here is exact and nothing depends on how fast the machine is."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cli_run import run_cli
from epo_tui import budget, paths, protocol
from epo_tui.budget import Deadline, budget_seconds, format_budget
from epo_tui.config import Config, SearchConfig, config_from_data, load_config, parse_config
from epo_tui.errors import ConfigError

STEP_S = 10.0  # fake seconds per iteration: a budget of 25 s allows exactly 3 iterations (0, 10, 20 < 25)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """Deadlines read a fake clock that each search iteration (Search.step) moves STEP_S forward."""
    from epo_tui.engine.search import Search

    fake = FakeClock()
    monkeypatch.setattr(budget, "now", fake)
    real_step = Search.step

    def step(self, state):
        out = real_step(self, state)
        fake.t += STEP_S
        return out

    monkeypatch.setattr(Search, "step", step)
    return fake


def _config(tiny_dir: Path) -> str:
    return str(tiny_dir / "config.toml")


def _result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


# ----------------------------------------------------------------------------------------------
# What a budget may be


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("90s", 90.0), ("2m", 120.0), ("1m30s", 90.0), ("1h", 3600.0), ("1h 30m", 5400.0),
    ("1.5m", 90.0), (" 2M ", 120.0), ("0.5", 0.5), ("", None), ("none", None), ("None", None),
])
def test_budget_formats(text, seconds):
    assert budget_seconds(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("0", "must be more than 0 s, found '0'"),
    ("0m0s", "must be more than 0 s"),
    ("soon", "expected a duration such as 90, 90s, 2m, 1m30s or 1h, found 'soon'"),
    ("1m30", "expected a duration"),  # a bare number only alone: 30 what?
    ("30s1m", "expected a duration"),
    ("-5", "expected a duration"),
    ("2 minutes", "expected a duration"),
    ("inf", "expected a duration"),
])
def test_bad_budgets(text, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        budget_seconds(text)


@pytest.mark.parametrize("seconds", [120.0, 90.0, 3600.0, 3661.25, 12.5, 0.25, 40.0, 7.0])
def test_format_reads_back(seconds):
    assert budget_seconds(format_budget(seconds)) == seconds
    assert format_budget(120) == "2m" and format_budget(90) == "1m30s" and format_budget(5400) == "1h30m"


def test_deadline_counts_from_its_start_and_not_while_paused():
    fake = FakeClock()
    deadline = Deadline(25.0, clock=fake)
    fake.t += 20
    assert not deadline.expired and deadline.left_s() == 5.0
    deadline.pause()
    fake.t += 100
    assert not deadline.expired and deadline.left_s() == 5.0
    deadline.resume()
    fake.t += 5
    assert deadline.expired and deadline.left_s() == 0.0
    assert Deadline(None, clock=fake).left_s() is None and not Deadline(None, clock=fake).expired


def test_config_key_reads_strings_and_seconds_and_names_itself_when_wrong():
    assert parse_config('[search]\ntime_budget = "1m30s"\n').search.time_budget == "1m30s"
    assert budget_seconds(parse_config("[search]\ntime_budget = 90\n").search.time_budget) == 90.0
    assert Config().search.time_budget == ""  # no budget unless asked
    for text, message in (('"2 weeks"', "expected a duration"), ("0", "must be more than 0 s"),
                          ("true", "expected a string")):
        with pytest.raises(ConfigError) as info:
            parse_config(f"[search]\ntime_budget = {text}\n", source="c.toml")
        assert str(info.value).startswith(f"c.toml: search.time_budget: {message}")


def test_config_key_round_trips_through_plain_data():
    config = Config(search=SearchConfig(time_budget="2m"))
    again = config_from_data(json.loads(json.dumps(config.to_dict())))  # as a session or a client keeps it
    assert again.search == config.search


def test_the_demo_stops_after_two_minutes():
    from epo_tui.demo.pack import config_text

    demo = load_config(str(paths.demo_config_file()))
    assert budget_seconds(demo.search.time_budget) == 120.0 and demo.search.iterations == 300
    # bench --quality's figures in the README were measured with these
    assert (demo.search.candidates, demo.search.prompt_tokens, demo.search.penalty_min) == (32, 28, 0.5)
    shipped = paths.demo_config_file().read_text()
    assert "about two minutes" not in shipped
    # the pack's config is what the build writes (the feature line aside)
    built = config_text(524, None).split("[search]")[1]
    assert shipped.split("[search]")[1] == built


# ----------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("argv, message", [
    (["run", "--time-budget", "0"], "epo-tui: error: --time-budget: must be more than 0 s, found '0'"),
    (["run", "--time-budget", "soon"], "epo-tui: error: --time-budget: expected a duration such as 90, 90s, 2m, "
                                       "1m30s or 1h, found 'soon'"),
    (["batch", "--features", "1,2", "--time-budget", "1x"], "epo-tui: error: --time-budget: expected a duration"),
    (["bench", "--time-budget", "2m"], "epo-tui: error: --time-budget: a budget per latent of --quality"),
    (["bench", "--quality", "--heldout", "unused.jsonl", "--time-budget", "2mm"],
     "epo-tui: error: --time-budget: expected a duration"),
])
def test_bad_flag_is_one_line_and_exit_2(tiny_dir, tmp_path, argv, message):
    out_flag = ["--out", tmp_path / "never"] if argv[0] != "bench" else []
    code, out, err = run_cli(*argv[:1], "--config", _config(tiny_dir), *argv[1:], *out_flag)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_bad_config_key_is_one_line_and_exit_2(tiny_dir, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(_config_text(tiny_dir, 'time_budget = "fortnight"'))
    code, out, err = run_cli("run", "--config", config, "--out", tmp_path / "never")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{config}: search.time_budget: expected a duration" in err


def _config_text(tiny_dir: Path, search_line: str) -> str:
    """The tiny config with absolute paths and one more [search] line."""
    text = (tiny_dir / "config.toml").read_text()
    for key in ("model", "sae"):
        text = text.replace(f'path = "{key}"', f'path = "{tiny_dir / key}"')
    assert "[search]\n" in text
    return text.replace("[search]\n", f"[search]\n{search_line}\n")


def test_run_stops_at_the_budget_with_whole_results_and_exit_0(tiny_dir, tmp_path, clock):
    out = tmp_path / "budget"
    code, stdout, err = run_cli("run", "--config", _config(tiny_dir), "--iterations", 8, "--time-budget", "25s",
                                "--out", out)
    assert code == 0, err
    assert stdout.startswith("time budget 25s ran out after 3/8 iterations") and "interrupted" not in stdout
    assert "starting, 8 iterations or 25s, whichever comes first" in err
    result = _result(out)
    timings = result["timings"]
    assert timings["iterations_run"] == 3 and timings["iterations_requested"] == 8
    assert timings["budget_ran_out"] is True and timings["interrupted"] is False and timings["time_budget_s"] == 25
    assert result["config"]["search"]["time_budget"] == "25s"
    assert len(result["best_objective_history"]) == 3 and len(result["elites"]) == result["config"]["search"]["elites"]
    assert [protocol.Elite.from_json(elite).to_json() for elite in result["elites"]] == result["elites"]
    report = (out / "report.md").read_text()
    assert "Stopped by the time budget (25s) after 3 of 8 iterations" in report and "## Frontier" in report
    from epo_tui import sessions

    session = sessions.find_session(result["session"])
    assert session.read_meta()["status"] == "stopped" and session.read_meta()["iteration"] == 3

    # a resumed session gets a budget afresh: 15 s more is two iterations
    again = tmp_path / "resumed"
    code, stdout, err = run_cli("run", "--resume", result["session"], "--time-budget", "15", "--out", again)
    assert code == 0, err
    assert stdout.startswith("time budget 15s ran out after 2/5 iterations")
    assert _result(again)["timings"]["iterations_run"] == 2 and session.read_meta()["iteration"] == 5


def test_the_iteration_cap_still_applies_and_none_drops_the_configs_budget(tiny_dir, tmp_path, clock):
    config = tmp_path / "c.toml"
    config.write_text(_config_text(tiny_dir, 'time_budget = "25s"'))
    code, stdout, err = run_cli("run", "--config", config, "--iterations", 2, "--out", tmp_path / "cap")
    assert code == 0, err
    assert stdout.startswith("ran 2/2 iterations")  # the cap came first
    timings = _result(tmp_path / "cap")["timings"]
    assert timings["budget_ran_out"] is False and timings["time_budget_s"] == 25
    code, stdout, err = run_cli("run", "--config", config, "--iterations", 4, "--out", tmp_path / "budget")
    assert code == 0 and stdout.startswith("time budget 25s ran out after 3/4 iterations"), err
    code, stdout, err = run_cli("run", "--config", config, "--iterations", 4, "--time-budget", "none",
                                "--out", tmp_path / "none")
    assert code == 0 and stdout.startswith("ran 4/4 iterations"), err
    assert _result(tmp_path / "none")["timings"]["time_budget_s"] is None


def test_batch_splits_the_budget_between_the_features(tiny_dir, tmp_path, clock):
    out = tmp_path / "batch"
    code, stdout, err = run_cli("batch", "--config", _config(tiny_dir), "--features", "1,2", "--iterations", 8,
                                "--time-budget", "50s", "--out", out)
    assert code == 0, err
    assert stdout.startswith("ran 2/2 features") and "time budget 25s per feature" in stdout
    index = json.loads((out / "index.json").read_text())
    assert not index["interrupted"] and index["features_missing"] == []
    for feature in (1, 2):
        result = _result(out / f"feature-{feature}")
        assert result["config"]["search"]["time_budget"] == "25s"
        timings = result["timings"]
        assert timings["iterations_run"] == 3 and timings["budget_ran_out"] and not timings["interrupted"]


def test_budget_share_is_an_equal_split():
    from epo_tui.engine.runner import budget_share

    config = Config(search=SearchConfig(time_budget="2m"))
    assert budget_share(config, 3).search.time_budget == "40s"
    assert budget_share(config, 7).search.time_budget == "17.143s"
    assert budget_share(config, 0) == config and budget_share(Config(), 4) == Config()


def test_bench_quality_runs_each_latent_for_the_budget(tiny_dir, tmp_path, clock):
    from search_fixtures import HELDOUT_TEXTS

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in HELDOUT_TEXTS))
    code, out, err = run_cli("bench", "--quality", "--config", _config(tiny_dir), "--heldout", heldout,
                             "--latents", 2, "--time-budget", "25s", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["search"]["per_latent"] == "25s" and report["search"]["time_budget_s"] == 25
    assert report["search"]["iterations"] is None  # the budget alone: no fixed count
    assert [row["iterations_run"] for row in report["latents"]] == [3, 3]
    assert all(row["budget_ran_out"] for row in report["latents"]) and not report["interrupted"]
    code, out, err = run_cli("bench", "--quality", "--config", _config(tiny_dir), "--heldout", heldout,
                             "--latents", 1, "--time-budget", "25s", "--iterations", 2, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["search"]["per_latent"] == "25s or 2 iterations, whichever comes first"
    assert report["latents"][0]["iterations_run"] == 2 and not report["latents"][0]["budget_ran_out"]


def test_bench_quality_searches_each_latent_for_30_seconds_unless_told_otherwise(tiny_dir, tmp_path, clock):
    from search_fixtures import HELDOUT_TEXTS

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in HELDOUT_TEXTS))
    args = ("bench", "--quality", "--config", _config(tiny_dir), "--heldout", heldout, "--latents", 1, "--json")
    code, out, err = run_cli(*args)
    assert code == 0, err
    report = json.loads(out)
    assert report["search"]["per_latent"] == "30s" and report["search"]["time_budget_s"] == 30
    assert report["latents"][0]["iterations_run"] == 30 // STEP_S and report["latents"][0]["budget_ran_out"]
    code, out, err = run_cli(*args, "--iterations", 1)  # a fixed count instead of the budget
    assert code == 0, err
    report = json.loads(out)
    assert report["search"]["per_latent"] == "1 iteration" and report["search"]["time_budget_s"] is None
    assert report["latents"][0]["iterations_run"] == 1 and not report["latents"][0]["budget_ran_out"]


# ----------------------------------------------------------------------------------------------
# Progress


def test_eta_follows_whichever_ends_the_search_first():
    from epo_tui.progress import seconds_left

    assert seconds_left(10, 100, [9.0] + [1.0] * 9, None) == 90.0  # the first, compiling, iteration left out
    assert seconds_left(10, 100, [9.0] + [1.0] * 9, 30.0) == 30.0  # the budget ends it sooner
    assert seconds_left(10, 100, [9.0] + [1.0] * 9, 300.0) == 90.0
    assert seconds_left(1, 100, [9.0], 30.0) == 30.0 and seconds_left(1, 100, [9.0], None) is None
    assert seconds_left(1, 3, [9.0], 110.0) == 18.0  # the first iteration's time bounds the rest
    assert seconds_left(3, 3, [9.0, 1.0, 1.0], 110.0) is None and seconds_left(1, 1, [9.0], 110.0) is None


def test_progress_bar_follows_the_budget_when_it_ends_sooner():
    from epo_tui.progress import _Progress

    fake = FakeClock()
    progress = _Progress()
    progress.search_started("feature 1", 100, Deadline(60.0, clock=fake))
    assert progress.limits() == "100 iterations or 1m, whichever comes first"
    fake.t += 30
    assert progress.completed(10) == 50.0  # half the budget, a tenth of the iterations
    assert progress.completed(80) == 80.0
    progress.search_started("feature 1", 100, Deadline(None))
    assert progress.limits() == "100 iterations" and progress.completed(10) == 10.0


def test_ui_status_eta_uses_the_budget_left():
    from epo_tui.tui.components.status import eta_text

    assert eta_text(10, 100, 1.0) == "ETA 1m30s"
    assert eta_text(10, 100, 1.0, budget_left=20.0) == "ETA 20s"
    assert eta_text(10, 100, 1.0, budget_left=600.0) == "ETA 1m30s"


# ----------------------------------------------------------------------------------------------
# The worker (the UI's searches)


def test_worker_stops_at_the_configs_budget_and_not_while_paused(tiny_pair, tiny_config, tmp_path, clock):
    from worker_process import InProcessWorker

    w = InProcessWorker(tiny_pair, replace(tiny_config, search=replace(tiny_config.search, time_budget="25s")),
                        tmp_path / "sessions")
    started = [e for e in w.send("start", search={"iterations": 50}) if e["type"] == "started"][0]
    assert started["iterations_total"] == 50
    progress = [e for e in w.iterate(2) if e["type"] == "progress"]
    assert [e["budget_left_s"] for e in progress] == [15.0, 5.0]
    w.send("pause")
    clock.t += 1000  # a paused search spends none of its budget
    w.send("resume")
    events = w.iterate()
    finished = [e for e in events if e["type"] == "finished"]
    assert len(finished) == 1 and w.worker.active is None
    assert finished[0]["status"] == "stopped" and finished[0]["iteration"] == 3
    assert finished[0]["reason"] == "its time budget (25s) ran out"
    folder = Path(finished[0]["folder"])
    timings = _result(folder)["timings"]
    assert timings["budget_ran_out"] and not timings["interrupted"] and timings["iterations_run"] == 3
    assert json.loads((folder / "session.json").read_text())["status"] == "stopped"


def test_worker_takes_the_budget_from_the_start_command(tiny_pair, tiny_config, tmp_path, clock):
    from worker_process import InProcessWorker

    w = InProcessWorker(tiny_pair, tiny_config, tmp_path / "sessions")
    w.send("start", search={"iterations": 50, "time_budget": "15s"})  # as the settings form sends it
    events = w.iterate(2)
    assert [e["iteration"] for e in events if e["type"] == "finished"] == [2]
    w.send("start", search={"iterations": 2})  # without one: the iterations alone
    events = w.iterate(2)
    assert [e["budget_left_s"] for e in events if e["type"] == "progress"] == [None, None]
    assert [e["reason"] for e in events if e["type"] == "finished"] == [None]


def test_progress_lines_come_every_tenth_of_the_budget(capsys):
    from types import SimpleNamespace

    import numpy as np

    from epo_tui.progress import _ProgressLines

    fake = FakeClock()
    lines = _ProgressLines()
    lines.search_started("feature 1", 1000, Deadline(100.0, clock=fake))
    for i in range(1, 11):  # 5 s per iteration: a tenth of the budget every second iteration
        fake.t += 5
        lines.iteration_done(SimpleNamespace(iteration=i, act_K=np.zeros(2), xent_K=np.ones(2), frontier=()), 5.0)
    shown = [line.split("iteration ")[1].split("/")[0] for line in capsys.readouterr().err.splitlines()
             if "iteration " in line]
    assert shown == ["1", "2", "4", "6", "8", "10"]

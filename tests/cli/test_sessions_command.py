"""`epo-tui run` records a session; `sessions list | show | export [--favorite K] | delete` and
`run --resume` on it, through the command line."""

from __future__ import annotations

import json

from epo_tui import favorites, sessions
from epo_tui.config import load_config
from cli_run import run_cli


def test_run_then_resume_list_show_favorite_delete(tiny_dir, tmp_path):
    config = tiny_dir / "config.toml"
    code, out, err = run_cli("run", "--config", config, "--iterations", 5, "--out", tmp_path / "a")
    assert code == 0, err
    session_id = json.loads((tmp_path / "a" / "result.json").read_text())["session"]
    assert out.rstrip().endswith(f"session {session_id}")
    meta = sessions.find_session(session_id).read_meta()
    assert (meta["status"], meta["checkpoint_iteration"], meta["iterations_total"]) == ("finished", 5, 5)

    code, out, err = run_cli("run", "--resume", session_id[-6:], "--iterations", 9, "--out", tmp_path / "b")
    assert code == 0, err
    resumed = json.loads((tmp_path / "b" / "result.json").read_text())
    assert resumed["session"] == session_id and resumed["timings"]["iterations_run"] == 4
    assert len(resumed["best_objective_history"]) == 9
    assert sessions.find_session(session_id).read_meta()["checkpoint_iteration"] == 9

    code, out, err = run_cli("sessions", "list")
    assert code == 0 and session_id in out and "finished" in out and "9/9" in out
    code, out, err = run_cli("sessions", "show", session_id)
    assert code == 0 and session_id in out and "## Elites" in out

    code, out, err = run_cli("sessions", "export", session_id, "--favorite", 0, "--config", config)
    assert code == 0, err
    saved = favorites.read_favorites(favorites.favorites_path(load_config(str(config))))
    assert len(saved) >= 1 and session_id in saved[-1]
    code, _, err = run_cli("sessions", "export", session_id, "--favorite", 99)
    assert code == 2 and "--favorite" in err

    for argv, message in ((("--resume", "nope"), "nope"),
                          (("--resume", session_id, "--feature", 3), "drop --feature"),
                          (("--resume", ""), "--resume: give a session's id"),
                          (("--resume", session_id, "--iterations", 9),
                           f"session {session_id} is at iteration 9 already: the new total of iterations must be "
                           "more than that")):
        code, _, err = run_cli("run", *argv, "--out", tmp_path / "never")
        assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()

    # a finished session resumed without --iterations goes on for another search's worth (its config's 5)
    code, out, err = run_cli("run", "--resume", session_id, "--out", tmp_path / "c")
    assert code == 0, err
    more = json.loads((tmp_path / "c" / "result.json").read_text())
    assert (more["timings"]["iterations_run"], len(more["best_objective_history"])) == (5, 14)
    assert out.startswith("ran 5/5 iterations (the session at iteration 14 of 14) in ")

    code, out, err = run_cli("sessions", "delete", session_id)
    assert code == 0 and not (sessions.sessions_dir() / session_id).exists()
    code, _, err = run_cli("sessions", "show", session_id)
    assert code == 2

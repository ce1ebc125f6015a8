"""`bench --quality --pairs` (epo_tui/bench/pairs.py): the pairs it draws fire together, the joint share it
reports is what a plain forward pass gives, and the command reports every pair."""

from __future__ import annotations

import json

import numpy as np
import pytest

from epo_tui.bench import pairs, quality
from epo_tui.engine.pairing import as_batch
from epo_tui.engine.sae import activations
from epo_tui.engine.search import Search
from cli_run import run_cli
import search_fixtures as fx


def _acts_RxLxS(pair, tokens_RxL) -> np.ndarray:
    return np.stack([np.asarray(activations(pair.sae, pair.forward(as_batch(r.tolist()), logits=False)[1][0]))
                     for r in tokens_RxL])


def _pairs_together(fires_PxS: np.ndarray) -> np.ndarray:
    """Every (a < b) on together at some position, by a co-occurrence count."""
    together_SxS = fires_PxS.T.astype(np.int64) @ fires_PxS.astype(np.int64)
    return np.argwhere(np.triu(together_SxS, k=1) > 0)


def test_cofiring_pairs_are_every_pair_on_together_on_a_counted_token(tiny_pair):
    tokens, mask = quality.heldout_rows(tiny_pair, fx.HELDOUT_TEXTS)
    expected = _pairs_together((_acts_RxLxS(tiny_pair, tokens) > 0)[mask])
    found = pairs.cofiring_pairs(tiny_pair, tokens, mask)
    assert len(found) > 10
    np.testing.assert_array_equal(found, expected)


def test_cofiring_pairs_above_a_floor_are_those_both_at_least_that_high_on_one_token(tiny_pair):
    tokens, mask = quality.heldout_rows(tiny_pair, fx.HELDOUT_TEXTS)
    acts_PxS = _acts_RxLxS(tiny_pair, tokens)[mask]
    floor_S = 0.4 * acts_PxS.max(0)
    expected = _pairs_together((acts_PxS > 0) & (acts_PxS >= floor_S))
    found = pairs.cofiring_pairs(tiny_pair, tokens, mask, floor_S)
    assert 0 < len(found) < len(pairs.cofiring_pairs(tiny_pair, tokens, mask))
    np.testing.assert_array_equal(found, expected)


def test_joint_activation_is_the_smaller_share_on_the_best_token(tiny_pair, tiny_config):
    search = Search(tiny_pair, tiny_config)
    state = search.initial_state()
    latents, maxima = (3, 7), (0.5, 2.0)
    joint, where = pairs.joint_activation(tiny_pair, search, state.tokens_KxN, latents, maxima)
    prefix = np.asarray(search.prefix_ids)
    full = np.concatenate([np.repeat(prefix[None], len(state.tokens_KxN), 0), state.tokens_KxN], axis=1)
    acts = _acts_RxLxS(tiny_pair, full)[:, len(prefix):, list(latents)]
    share_KxN = (acts / np.asarray(maxima)).min(-1)
    np.testing.assert_allclose(joint, share_KxN.max(-1), atol=1e-5)
    np.testing.assert_array_equal(where, share_KxN.argmax(-1))


def test_run_pairs_reports_each_pair_and_the_success_rule(tiny_pair, tiny_config, monkeypatch):
    lines, ranges = [], []

    def recording_search(pair, config, **kwargs):
        ranges.append((config.search.penalty_min, config.search.penalty_max))
        return Search(pair, config, **kwargs)

    monkeypatch.setattr(pairs, "Search", recording_search)
    report = pairs.run_pairs(tiny_pair, tiny_config, fx.HELDOUT_TEXTS, pairs=2, iterations=2, seed=1,
                             progress=lines.append)
    assert len(report["pairs"]) == 2 and not report["interrupted"]
    tokens, mask = quality.heldout_rows(tiny_pair, fx.HELDOUT_TEXTS)
    maxima, _ = quality.dataset_maxima(tiny_pair, tokens, mask)
    every = {tuple(p) for p in pairs.cofiring_pairs(tiny_pair, tokens, mask, pairs.COFIRING_SHARE * maxima).tolist()}
    acts_PxS = _acts_RxLxS(tiny_pair, tokens)[mask]
    for row in report["pairs"]:
        a, b = row["latents"]
        assert row["dataset_joint"] == pytest.approx(
            np.minimum(acts_PxS[:, a] / maxima[a], acts_PxS[:, b] / maxima[b]).max(), abs=1e-5)
        assert pairs.COFIRING_SHARE <= row["dataset_joint"] <= 1
        assert tuple(row["latents"]) in every
        assert row["dataset_max"] == pytest.approx([float(maxima[i]) for i in row["latents"]])
        assert row["success"] == (row["joint"] is not None and row["joint"] >= 0.5)
        if row["joint"] is not None:
            assert row["xent"] <= report["xent_limit"]
            assert row["unlimited_joint"] >= row["joint"] - 1e-6
    assert report["succeeded"] == sum(r["success"] for r in report["pairs"])
    assert report["heldout"]["cofiring_pairs"] == len(every)
    assert report["heldout"]["cofiring_share"] == pairs.COFIRING_SHARE
    assert report["search"]["combine"] == "lp" and report["search"]["read"] == "max"
    assert set(ranges) == {pairs.PAIR_PENALTY_RANGE}  # every pair's search, not the config's own range
    assert pairs.PAIR_PENALTY_RANGE != (tiny_config.search.penalty_min, tiny_config.search.penalty_max)
    assert (report["search"]["penalty_min"], report["search"]["penalty_max"]) == pairs.PAIR_PENALTY_RANGE
    assert any("latents" in line for line in lines)


def test_bench_pairs_command_prints_json_and_refuses_bad_input(tiny_dir, tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in fx.HELDOUT_TEXTS))
    config = tiny_dir / "config.toml"
    code, out, err = run_cli("bench", "--quality", "--pairs", 1, "--config", config, "--heldout", heldout,
                             "--iterations", 1, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["pairs"]) == 1 and report["search"]["iterations"] == 1
    assert report["heldout"]["cofiring_share"] == pairs.COFIRING_SHARE
    code, out, err = run_cli("bench", "--quality", "--pairs", 1, "--cofiring", 0, "--config", config,
                             "--heldout", heldout, "--iterations", 1, "--json")
    assert code == 0, err
    above_zero = json.loads(out)["heldout"]
    assert above_zero["cofiring_share"] == 0 and above_zero["cofiring_pairs"] > report["heldout"]["cofiring_pairs"]
    code, out, _ = run_cli("bench", "--help")
    assert code == 0 and f"(default {pairs.COFIRING_SHARE:g}, bench/pairs.py's COFIRING_SHARE" in " ".join(out.split())
    for argv, message in ((("--quality", "--pairs", 0), "--pairs: must be >= 1, found 0"),
                          (("--pairs", 2), "--pairs: a kind of --quality benchmark"),
                          (("--quality", "--pairs", "--cofiring", 1), "--cofiring: a share of each latent's"),
                          (("--quality", "--cofiring", 0.5), "--cofiring: only with --pairs, whose draw it sets"),
                          (("--quality", "--pairs", 2, "--latents", 3), "--latents: the single-latent --quality"),
                          (("--latents", 3), "--latents: the single-latent --quality"),
                          (("--size", "100x30"), "--size: an option of --ui"),
                          (("--presses", 5), "--presses: an option of --ui")):
        code, out, err = run_cli("bench", *argv, "--config", config, "--heldout", heldout)
        assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    for empty in ("", "\n\n"):  # no document, or only blank lines: one line, not an IndexError
        (tmp_path / "empty.txt").write_text(empty)
        code, out, err = run_cli("bench", "--quality", "--config", config, "--heldout", tmp_path / "empty.txt")
        assert (code, out, err) == (2, "", f"epo-tui: error: --heldout: {tmp_path / 'empty.txt'} holds no text\n")


def test_the_printed_report_has_a_row_per_pair_and_each_prompt_whole(capsys):
    def row(latents, joint, success, prompt):
        return {"latents": latents, "dataset_max": [3.65, 3.135], "dataset_joint": 0.02, "joint": joint,
                "token": None if prompt is None else " You", "xent": None if prompt is None else 5.634,
                "prompt": prompt, "success": success, "unlimited_joint": 0.672, "unlimited_xent": 7.94}

    long_prompt = ("Then [bold]You[/bold] may\nadd the users to the group, as the handbook says in its chapter "
                   "on accounts")
    report = {"model": "demo-gpt2", "sae": "demo-sae", "hook": "blocks.2.hook_resid_pre",
              "heldout": {"cofiring_pairs": 12345, "cofiring_share": 0.25},
              "search": {"per_pair": "30s", "elites": 8, "candidates": 32, "lp_p": 0.1, "lp_offset": 1.0,
                         "penalty_min": 0.02, "penalty_max": 2.0},
              "pairs": [row([616, 1316], 0.634, True, long_prompt), row([17, 1546], None, False, None)],
              "succeeded": 1, "fraction": 0.5, "goal_fraction": 0.6, "half_maximum": 0.5, "xent_limit": 5.751,
              "seconds": {"total": 61.2}}
    pairs.print_pairs(report)
    lines = capsys.readouterr().out.splitlines()
    assert "12,345 pairs fire together on the held-out text (both at >= 25% of their held-out maxima on one token)" \
        in lines[0] and "λ 0.02..2" in lines[0]
    first = next(line for line in lines if line.startswith("616 + 1316"))
    assert first.split() == ["616", "+", "1316", "3.65,", "3.13", "2%", "63%", "'", "You'", "5.63", "yes", "67%", "at",
                             "7.94"]
    second = next(line for line in lines if line.startswith("17 + 1546"))
    assert second.split() == ["17", "+", "1546", "3.65,", "3.13", "2%", "-", "-", "no", "67%", "at", "7.94"]
    assert f"  616 + 1316: {long_prompt!r}" in lines  # whole, its markup shown as text
    assert "  17 + 1546: none" in lines
    assert lines[-1] == ("both latents at >= 50% of their held-out maxima on one token at xent <= 5.75: 1/2 = 50% "
                         "(misses the goal of 60%); 61 s")

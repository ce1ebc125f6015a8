"""`epo-tui bench --quality`: held-out rows, windows and maxima equal independent recomputations
through `score`; the verdict follows the rule; the command's errors and output."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from epo_tui.bench import quality
from epo_tui.engine.scoring import score_text
from epo_tui.engine.search import Search
from epo_tui.errors import UserError
from cli_run import run_cli
import search_fixtures as fx


def test_rows_hold_the_documents_joined_by_eos_after_bos(tiny_pair):
    tokens, mask = quality.heldout_rows(tiny_pair, fx.HELDOUT_TEXTS)
    tokenizer = tiny_pair.model.tokenizer
    bos, eos = tiny_pair.model.encode("")[0], tokenizer.eos_token_id
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in fx.HELDOUT_TEXTS]
    stream = [t for doc in docs for t in (*doc, eos)]
    assert (tokens[:, 0] == bos).all() and not mask[:, 0].any()
    assert tokens[:, 1:].reshape(-1)[:len(stream)].tolist() == stream
    # the EOS between documents is in the rows but never counted: no prompt can hold it
    assert tokens[mask].tolist() == [t for doc in docs for t in doc]
    assert not mask[tokens == eos].any()


def test_a_latent_firing_on_the_document_separator_has_no_dataset_max_there(tiny_pair):
    """Issue 12: the EOS between held-out documents became a latent's "dataset max", in a context no
    prompt can reach. Here EOS's embedding gets a large push along a unit direction u, and latent 0
    reads u: it fires on every separator far above any text token. Its dataset max must come from a
    text token all the same."""
    import jax.numpy as jnp

    from epo_tui.engine.pairing import as_batch
    from epo_tui.engine.sae import activations

    model, sae = tiny_pair.model, tiny_pair.sae
    eos = model.tokenizer.eos_token_id
    u_D = np.random.default_rng(0).standard_normal(model.d_model).astype(np.float32)
    u_D /= np.linalg.norm(u_D)
    params = {**model.params, "wte_VxD": model.params["wte_VxD"].at[eos].add(100 * u_D)}
    eos_sae = replace(sae, W_enc_DxS=sae.W_enc_DxS.at[:, 0].set(jnp.asarray(u_D)), b_enc_S=sae.b_enc_S.at[0].set(0.0))
    pair = replace(tiny_pair, model=replace(model, params=params), sae=eos_sae, _replicas={})
    tokens, mask = quality.heldout_rows(pair, fx.HELDOUT_TEXTS)
    acts_P = np.concatenate([np.asarray(activations(eos_sae, pair.forward(as_batch(r.tolist()), logits=False)[1][0]))[:, 0]
                             for r in tokens])
    is_eos_P = (tokens == eos).reshape(-1) & (np.arange(tokens.size) % tokens.shape[1] > 0)
    text_max = acts_P[mask.reshape(-1)].max()
    assert acts_P[is_eos_P].min() > text_max + 20  # the separators are where it fires most ...
    maxima, where = quality.dataset_maxima(pair, tokens, mask)
    assert maxima[0] == pytest.approx(text_max, abs=1e-4)  # ... and yet none of them is the dataset max
    assert tokens.reshape(-1)[where[0]] != eos


def test_dataset_maxima_equal_the_max_of_score_over_every_position(tiny_pair):
    tokens, mask = quality.heldout_rows(tiny_pair, fx.HELDOUT_TEXTS)
    maxima, where = quality.dataset_maxima(tiny_pair, tokens, mask)
    # independent: each row scored on its own through `score` (which tokenizes text, so use ids directly)
    from epo_tui.engine.pairing import as_batch
    from epo_tui.engine.sae import activations

    per_row = []
    for row, m in zip(tokens, mask, strict=True):
        _, sae_in = tiny_pair.forward(as_batch(row.tolist()), logits=False)
        per_row.append(np.asarray(activations(tiny_pair.sae, sae_in[0]))[m])
    every = np.concatenate(per_row)
    np.testing.assert_allclose(maxima, every.max(0), rtol=1e-5, atol=1e-5)
    flat_acts = np.full((tokens.size, tiny_pair.sae.d_sae), -np.inf, np.float32)
    flat_acts[mask.reshape(-1)] = every
    np.testing.assert_allclose(flat_acts[where, np.arange(tiny_pair.sae.d_sae)], maxima, rtol=1e-5, atol=1e-5)


def test_windows_never_cross_rows_or_hold_special_tokens(tiny_pair):
    tokens, mask = quality.heldout_rows(tiny_pair, fx.HELDOUT_TEXTS)
    special = tiny_pair.model.special_token_ids()
    windows = quality.heldout_windows(tokens, mask, 5)
    assert len(windows) > 0 and windows.shape[1] == 5
    assert not np.isin(windows, special).any()
    rows = {tuple(r) for r in tokens.tolist()}
    for window in windows.tolist():  # each window is a slice of one row, at a multiple of 5 after BOS
        assert any(tuple(row[s:s + 5]) == tuple(window) for row in rows for s in range(1, len(row) - 4, 5))


def test_window_xent_is_the_mean_xent_that_score_reports(tiny_pair, tiny_config):
    search = Search(tiny_pair, replace(tiny_config, search=replace(tiny_config.search, prompt_tokens=6)))
    tokens, mask = quality.heldout_rows(tiny_pair, fx.HELDOUT_TEXTS)
    windows = quality.heldout_windows(tokens, mask, 6)[:3]
    xents = quality.window_xents(search, windows)
    compared = 0
    for window, xent in zip(windows, xents, strict=True):
        scored = score_text(tiny_pair, tiny_pair.model.decode(window), tiny_config.feature.index)
        if scored["token_ids"][1:] != window.tolist():
            continue  # this window's text tokenizes differently on its own: not comparable
        assert xent == pytest.approx(np.mean(scored["xent"][1:]), abs=1e-4)
        compared += 1
    assert compared >= 2


def test_best_prompts_respect_the_xent_limit(tiny_pair, tiny_config):
    search = Search(tiny_pair, tiny_config)
    state = search.initial_state()
    for _ in range(2):
        state, _ = search.step(state)
    xent = np.concatenate([state.frontier.xent, state.xent_K])
    act = np.concatenate([state.frontier.act, state.act_K])
    limit = float(np.median(xent))
    best = quality.best_prompts(search, state, limit)
    assert best["best_act"] == pytest.approx(act.max())
    assert best["fluent_act"] == pytest.approx(act[xent <= limit].max())
    assert best["fluent_xent"] <= limit
    assert quality.best_prompts(search, state, float(xent.min()) - 1)["fluent_act"] is None


def test_run_quality_reports_each_latent_and_the_verdict_rule(tiny_pair, tiny_config):
    lines = []
    report = quality.run_quality(tiny_pair, tiny_config, fx.HELDOUT_TEXTS, latents=2, iterations=2, seed=3,
                                 labels={}, progress=lines.append)
    assert len(report["latents"]) == 2 and not report["interrupted"]
    assert report["xent_limit"] == pytest.approx(report["heldout"]["median_window_xent"] + 1.0)
    tokens, mask = quality.heldout_rows(tiny_pair, fx.HELDOUT_TEXTS)
    maxima, _ = quality.dataset_maxima(tiny_pair, tokens, mask)
    for row in report["latents"]:
        assert maxima[row["latent"]] > 0  # only alive latents are drawn
        assert row["dataset_max"] == pytest.approx(float(maxima[row["latent"]]))
        fluent = row["fluent_act"]
        assert row["beat"] == (fluent is not None and fluent > row["dataset_max"])
        assert "[" in row["dataset_context"]
        assert 1 <= row["distinct_elites"] <= tiny_config.search.elites and row["hypervolume"] >= 0
        assert row["frontier_xent"][0] <= row["frontier_xent"][1]
    assert report["beaten"] == sum(r["beat"] for r in report["latents"])
    distinct = [r["distinct_elites"] for r in report["latents"]]
    goal = math.ceil(0.75 * tiny_config.search.elites)  # 6 of 8
    assert report["distinct_elites"] == {"goal": goal, "min": min(distinct),
                                         "searches_meeting_goal": sum(d >= goal for d in distinct)}
    assert report["search"]["seed"] == tiny_config.search.seed
    again = quality.run_quality(tiny_pair, tiny_config, fx.HELDOUT_TEXTS, latents=2, iterations=2, seed=3)
    assert [r["latent"] for r in again["latents"]] == [r["latent"] for r in report["latents"]]
    assert any("latent" in line for line in lines)


def test_hypervolume_is_the_area_under_the_best_act_so_far_up_to_the_limit():
    # points (xent, act): (2, 1) then (3, 4) then (5, 9) past the limit 4; dataset max 2
    xent, act = np.array([3.0, 2.0, 5.0, 3.5]), np.array([4.0, 1.0, 9.0, 2.0])
    # from 2 to 3 the best is 1/2, from 3 to 4 it is 4/2 (the point at 3.5 is dominated)
    assert quality.frontier_hypervolume(xent, act, 4.0, 2.0) == pytest.approx(0.5 * 1 + 2.0 * 1)
    assert quality.frontier_hypervolume(xent, act, 1.0, 2.0) == 0.0  # nothing under the limit
    assert quality.frontier_hypervolume(np.array([1.0]), np.array([-3.0]), 2.0, 1.0) == 0.0  # never below zero
    with pytest.raises(ValueError):
        quality.frontier_hypervolume(xent, act, 4.0, 0.0)


def test_distinct_prompts_counts_rows():
    assert quality.distinct_prompts(np.array([[1, 2], [1, 2], [2, 1]], np.int32)) == 2


def test_read_heldout_reads_jsonl_and_text_and_names_bad_lines(tmp_path):
    jsonl = tmp_path / "h.jsonl"
    jsonl.write_text('{"name": "a", "text": "one"}\n\n{"text": "two"}\n')
    assert quality.read_heldout(jsonl) == ["one", "two"]
    plain = tmp_path / "h.txt"
    plain.write_text("just text\n")
    assert quality.read_heldout(plain) == ["just text\n"]
    jsonl.write_text('{"text": "one"}\n{"nope": 1}\n')
    with pytest.raises(UserError, match=r"h\.jsonl:2: expected a JSON object with a 'text' field"):
        quality.read_heldout(jsonl)


def test_bench_quality_command_prints_json_and_refuses_bad_input(tiny_dir, tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in fx.HELDOUT_TEXTS))
    config = tiny_dir / "config.toml"
    code, out, err = run_cli("bench", "--quality", "--config", config, "--heldout", heldout, "--latents", 1,
                          "--iterations", 1, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["latents"]) == 1 and report["search"]["iterations"] == 1
    for argv, message in (
        (("--latents", 0), "--latents: must be >= 1, found 0"),
        (("--model", "tiny"), "--quality: measures the model and SAE of --config or --demo, not --model tiny"),
        ((), None),
    ):
        extra = ("--heldout", heldout) if argv else ()
        code, out, err = run_cli("bench", "--quality", "--config", config, *extra, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert (message or "--quality: needs a held-out text") in err
    code, _, err = run_cli("bench", "--quality", "--config", config, "--heldout", tmp_path / "missing.jsonl")
    assert code == 2 and "cannot read" in err


def test_demo_and_config_together_are_refused(tiny_dir):
    code, out, err = run_cli("score", "--demo", "--config", tiny_dir / "config.toml", "hello")
    assert code == 2 and err.strip() == "epo-tui: error: --demo and --config: give one of them"


def test_common_options_work_before_and_after_the_command():
    from epo_tui.cli import build_parser

    parser = build_parser()
    for argv in (["--demo", "--debug", "score", "x"], ["score", "--demo", "--debug", "x"]):
        args = parser.parse_args(argv)
        assert (args.demo, args.debug, args.config) == (True, True, None)
    assert parser.parse_args(["--config", "a.toml", "run"]).config == "a.toml"
    assert parser.parse_args(["run", "--config", "a.toml"]).config == "a.toml"
    assert (parser.parse_args(["run"]).demo, parser.parse_args(["run"]).config) == (False, None)


def test_dataset_context_shows_pieces_of_a_character_as_score_does(tiny_pair):
    """A held-out maximum's context is shown token by token as everywhere else: a byte that is part of
    a character split over tokens as \\xNN, never U+FFFD."""
    tokens, _ = quality.heldout_rows(tiny_pair, ["we like 🙂 a lot"])
    row = tokens[0].tolist()
    first_byte = next(i for i, t in enumerate(row) if tiny_pair.model.token_bytes([t])[0] == b"\xf0")
    context = quality.context_snippet(tiny_pair, tokens, first_byte)
    assert "\ufffd" not in context and context.startswith("we like ") and "[\\xf0]" in context


def test_iteration_lines_give_the_highest_act_found_not_the_best_elites():
    from types import SimpleNamespace

    from epo_tui.engine.frontier import Frontier

    frontier = Frontier(xent=np.array([3.0, 6.0], np.float32), objective=np.array([1.0, 4.5], np.float32),
                        act=np.array([1.0, 4.5], np.float32), tokens=np.array([[1], [2]], np.int32))
    lines = []
    reporter = quality.IterationLines(lines.append, "latent 7", every=10)
    for iteration in (9, 10):  # an elite trades act for xent: 2.0 among the elites, 4.5 kept on the frontier
        reporter.iteration_done(SimpleNamespace(iteration=iteration, act_K=np.array([2.0]), frontier=frontier), 1.0)
    assert lines == ["latent 7: iteration 10, best act 4.500"]

"""Special tokens (BOS, EOS, pad, a chat template's turn markers) are never part of a prompt and never
count in a maximum (issue 12, parts 1 and 2): a latent that fires on `<|endoftext|>` does not make a
text look active, and `<|endoftext|>` typed into a prompt, injected or left in an old checkpoint never
reaches an elite, the frontier or a report."""

from __future__ import annotations

import json
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest

from cli_run import run_cli
from epo_tui.engine.scoring import score_text
from epo_tui.engine.search import Search
from epo_tui.errors import UserError
from epo_tui.protocol import Scored
from epo_tui.scored import peak

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def bos_pair(tiny_pair):
    """The tiny pair, its `<|endoftext|>` embedding pushed along a unit direction u that latent 0 reads
    (bias below every text token's): latent 0 fires hard on `<|endoftext|>` and on nothing else."""
    from epo_tui.engine.pairing import as_batch
    from epo_tui.engine.sae import activations

    model, sae = tiny_pair.model, tiny_pair.sae
    eot = model.tokenizer.convert_tokens_to_ids(EOT)
    u_D = np.random.default_rng(1).standard_normal(model.d_model).astype(np.float32)
    u_D /= np.linalg.norm(u_D)
    params = {**model.params, "wte_VxD": model.params["wte_VxD"].at[eot].add(60 * u_D)}
    pushed = replace(tiny_pair, model=replace(model, params=params), _replicas={},
                     sae=replace(sae, W_enc_DxS=sae.W_enc_DxS.at[:, 0].set(jnp.asarray(u_D)),
                                 b_enc_S=sae.b_enc_S.at[0].set(0.0)))
    ids = pushed.model.encode("A module is a file of Python code")
    pre_L = np.asarray(activations(pushed.sae, pushed.forward(as_batch(ids), logits=False)[1][0]))[:, 0]
    bias = -float(pre_L[1:].max()) - 0.1  # every text token below 0, BOS far above
    return replace(pushed, sae=replace(pushed.sae, b_enc_S=pushed.sae.b_enc_S.at[0].set(bias)), _replicas={})


# -- part 1: special-token positions count nowhere


def test_score_maximum_is_the_texts_own_when_the_latent_fires_on_bos(bos_pair, capsys):
    from epo_tui.terminal import print_score

    scored = Scored(feature=0, **score_text(bos_pair, "A module is a file of Python code", 0))
    acts = scored.activations
    assert scored.tokens[0] == EOT and acts[0] > 20 and max(acts[1:]) == 0.0
    assert scored.prompt_start == 1 and peak(scored) == (1, 0.0)
    print_score(scored)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("max act 0.000 at pos 1 ('A'); mean xent"), summary


def test_a_special_token_in_the_prefix_counts_nowhere_either(bos_pair):
    """Another instance: a chat-style prefix that holds `<|endoftext|>` (as Gemma's holds
    `<start_of_turn>`): the latent fires there too, but the maximum is still the text's."""
    scored = Scored(feature=0, **score_text(bos_pair, "A module is a file", 0, prefix=f"Q:{EOT}"))
    ids, acts, start = scored.token_ids, scored.activations, scored.prompt_start
    eot = bos_pair.model.tokenizer.convert_tokens_to_ids(EOT)
    assert ids[:start].count(eot) == 2 and min(acts[i] for i, t in enumerate(ids) if t == eot) > 20
    position, value = peak(scored)
    assert position >= start and value == max(acts[start:]) < 1


# -- part 2: no special or banned id in a prompt, whatever its source


def test_score_refuses_a_text_that_spells_a_special_token(tiny_dir):
    code, out, err = run_cli("score", "--config", str(tiny_dir / "config.toml"), f"Hi{EOT}")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"epo-tui: error: the text holds the special token '{EOT}', which a prompt never holds: remove it"]


def test_a_seed_prompt_with_a_special_token_is_refused(tiny_pair, tiny_config):
    search = Search(tiny_pair, tiny_config)
    with pytest.raises(UserError, match=f"the seed prompt holds the special token '{EOT}'"):
        search.initial_state(f"Hi{EOT}")


def test_a_seed_prompt_with_a_banned_token_is_refused(tiny_pair, tiny_config):
    config = replace(tiny_config, search=replace(tiny_config.search, banned_tokens=(" and",)))
    search = Search(tiny_pair, config)
    assert len(tiny_pair.model.tokenizer(" and", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(UserError, match="the seed prompt holds ' and', which search.banned_tokens bans"):
        search.initial_state("left and right")


def test_validity_is_checked_after_the_prefix_not_alone(tiny_pair, tiny_config):
    """`re` re-tokenizes to itself alone, but after the prefix `The` the text reads `There`, which the
    tokenizer cuts differently: that prompt is not what the model would be shown, so it is not valid."""
    tokenizer = tiny_pair.model.tokenizer
    re_ids = np.array(tokenizer("re", add_special_tokens=False)["input_ids"], np.int32)
    alone = Search(tiny_pair, replace(tiny_config, search=replace(tiny_config.search, prompt_tokens=len(re_ids))))
    after_the = Search(tiny_pair, replace(tiny_config, search=replace(tiny_config.search, prompt_tokens=len(re_ids),
                                                                      prefix="The")))
    assert tokenizer("There", add_special_tokens=False)["input_ids"] != after_the.prefix_ids[1:] + re_ids.tolist()
    assert alone.is_valid(re_ids) and not after_the.is_valid(re_ids)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    with_eot = np.array([re_ids[0], eot], np.int32)  # decodes to text that tokenizes back to the same ids
    assert tokenizer(tiny_pair.model.decode(with_eot), add_special_tokens=False)["input_ids"] == with_eot.tolist()
    assert not alone.is_valid(with_eot)


def test_a_resumed_checkpoint_holding_a_special_token_carries_none_on(tiny_pair, tiny_config, tmp_path):
    from epo_tui.engine.state_arrays import state_arrays
    from epo_tui.engine.session_search import RecordedSearch

    recorded = RecordedSearch.start(tiny_pair, tiny_config, root=tmp_path, checkpoint_seconds=0)
    recorded.step()
    eot = tiny_pair.model.tokenizer.convert_tokens_to_ids(EOT)
    state = recorded.state
    tokens = np.array(state.tokens_KxN)
    tokens[::2, 3] = eot  # every other elite, as an older version could have written them
    frontier_tokens = np.array(state.frontier.tokens)
    frontier_tokens[0, 0] = eot
    bad = replace(state, tokens_KxN=tokens, frontier=replace(state.frontier, tokens=frontier_tokens))
    recorded.finish("stopped")
    recorded.session.write_checkpoint(state_arrays(bad), bad.iteration, [e.to_json() for e in recorded.elites()])

    resumed = RecordedSearch.resume(tiny_pair, recorded.session, iterations_total=state.iteration + 2,
                                    checkpoint_seconds=0)
    assert not (resumed.state.tokens_KxN == eot).any() and not (resumed.state.frontier.tokens == eot).any()
    assert len(resumed.state.frontier) == len(state.frontier) - 1
    kept = tokens[1::2]  # the valid elites are kept as they were
    assert all(any((row == k).all() for row in resumed.state.tokens_KxN) for k in kept)
    while not resumed.done:
        resumed.step()
    result = resumed.finish("finished")
    assert all(eot not in e["token_ids"][e["prompt_start"]:] for e in result["elites"])
    assert all(eot not in point["token_ids"] for point in result["frontier"])


def test_the_worker_refuses_special_tokens_in_a_seed_prompt_and_an_inject(tmp_path, tiny_dir):
    from worker_process import WorkerProcess

    w = WorkerProcess(tmp_path)
    try:
        w.expect("hello")
        w.send("load", id="l", config_path=str(tiny_dir / "config.toml"))
        w.expect("ready", id="l")
        w.send("start", id="s", search={"iterations": 100000}, seed_prompt=f"Hi{EOT}")
        error = w.expect("error", id="s")
        assert error["message"] == f"the seed prompt holds the special token '{EOT}', which a prompt never holds: remove it"
        w.send("start", id="s2", search={"iterations": 100000})
        w.expect("started", id="s2")
        w.send("inject", id="i", text=f"Hi{EOT}")
        assert w.expect("error", id="i")["message"].startswith(f"inject: the text holds the special token '{EOT}'")
        w.send("inject", id="i2", text="Hi there")  # the worker keeps serving
        assert w.expect("injected", id="i2")["text"].startswith("Hi there")
        progress = w.expect("progress")
        eot = 0
        assert all(eot not in e["token_ids"][e["prompt_start"]:] for e in progress["elites"])
        w.send("shutdown", id="q")
        w.expect("bye", id="q")
    finally:
        w.close()


def test_result_json_of_the_score_command_has_the_prompt_start(tiny_dir):
    code, out, err = run_cli("score", "--config", str(tiny_dir / "config.toml"), "--json", "hello world")
    assert code == 0, err
    scored = json.loads(out)
    assert scored["prompt_start"] == 1 and scored["tokens"][0] == EOT


def test_text_that_is_not_utf8_is_refused_in_one_line_everywhere(tiny_pair, tiny_config):
    """Another instance of the same rule: a lone surrogate (JSON's `\\ud800`) in a seed prompt or an
    inject is refused in one line, as `score` refuses it, not a tokenizer TypeError."""
    search = Search(tiny_pair, tiny_config)
    with pytest.raises(UserError, match=r"^inject: the text is not valid UTF-8 \(at character 0\)$"):
        search.initial_state("\ud800x", "inject: the text")
    with pytest.raises(UserError, match=r"^search.prefix is not valid UTF-8"):
        Search(tiny_pair, replace(tiny_config, search=replace(tiny_config.search, prefix="Q\udcff")))


def test_an_inject_cut_inside_a_character_says_inject_and_why(tiny_pair, tiny_config):
    config = replace(tiny_config, search=replace(tiny_config.search, prompt_tokens=6))
    search = Search(tiny_pair, config)
    assert len(tiny_pair.model.tokenizer("🙂🙂", add_special_tokens=False)["input_ids"]) > 6
    with pytest.raises(UserError, match=r"^inject: the text does not re-tokenize .* search.prompt_tokens = 6 "):
        search.initial_state("🙂🙂", "inject: the text")

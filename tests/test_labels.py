"""Feature labels: the Neuronpedia-export reader/writer (epo_tui.labels) and the demo pack's automatic
labeller (epo_tui.demo.labels) on a tiny random GPT-2 + SAE, checked against an independent numpy
computation and against `score_text`, the search's own scoring path."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from epo_tui.errors import UserError
from epo_tui.labels import EXPORT_KEYS, LabelTarget, read_explanations, read_export, write_explanations

# ---------------------------------------------------------------------------------------------- reader/writer


def test_write_then_read_round_trip_keeps_text_as_is(tmp_path):
    records = [{"description": "files — “quoted” \x1b[31m", "index": "3", "modelId": "m", "extra": 1},
               {"index": 0, "description": "  padded\n"}]
    path = tmp_path / "explanations.jsonl"
    write_explanations(path, records)
    assert read_explanations(path) == {3: "files — “quoted” \x1b[31m", 0: "  padded\n"}
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert "—" in first  # ensure_ascii=False
    assert list(json.loads(first)) == ["modelId", "index", "description", "extra"]  # fixed order
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_gzipped_export_is_read_and_written(tmp_path):
    downloaded = tmp_path / "a.jsonl.gz"
    downloaded.write_bytes(gzip.compress(b'{"index": "7", "description": "seven"}\n\n'
                                         b'{"index": 8, "description": "eight"}\n'))
    assert read_explanations(downloaded) == {7: "seven", 8: "eight"}
    written = tmp_path / "b.jsonl.gz"
    write_explanations(written, [{"index": "1", "description": "one"}])
    assert written.read_bytes()[:2] == b"\x1f\x8b"
    assert read_explanations(written) == {1: "one"}


def test_unscored_the_first_explanation_of_an_index_wins_and_string_indices_are_read(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"index": "5", "description": "first"}\n'
                    '{"index": 5, "description": "second"}\n'
                    '   \n'
                    '{"index": "12", "description": "twelve", "typeName": "oai_token-act-pair"}\n')
    assert read_explanations(path) == {5: "first", 12: "twelve"}


@pytest.mark.parametrize("bad_line, reason", [
    ('{"index": 1, "description": "x"', "not valid JSON"),
    ('{"index": 1}', "no 'description'"),
    ('{"description": "x"}', "no 'index'"),
    ('{"index": "-2", "description": "x"}', "must not be negative"),
    ('{"index": -2, "description": "x"}', "must not be negative"),
    ('{"index": "2.5", "description": "x"}', "integer"),
    ('{"index": "--5", "description": "x"}', "integer"),
    ('{"index": "", "description": "x"}', "integer"),
    ('{"index": true, "description": "x"}', "integer"),
    ('{"index": 2, "description": 3}', "must be a string"),
    ('["index", 2]', "JSON object"),
])
def test_bad_line_is_a_user_error_naming_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"index": 0, "description": "ok"}\n\n' + bad_line + "\n")
    with pytest.raises(UserError) as err:
        read_explanations(path)
    message = str(err.value)
    assert f"{path}, line 3" in message and reason in message and "\n" not in message


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        read_explanations(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"index": 0, "description": "x"}\n' * 50)[:-20])
    with pytest.raises(UserError, match="gzip"):
        read_explanations(broken)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"index": 0, "description": "ok"}\n{"index": 1, "description": "caf\xe9"}\n')
    with pytest.raises(UserError, match="line 2: not UTF-8"):
        read_explanations(latin)


# ---------------------------------------------------------------------------------------------- which explanation
# Neuronpedia lists several explanations per latent; an export may be for another SAE or hold other layouts.

GPT2_L6 = LabelTarget(neuronpedia_id="gpt2-small/6-res-jb", d_sae=24576)


def _export(path: Path, records: list[dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _np(index, description: str, layer: str = "6-res-jb", **fields) -> dict:
    """A record as Neuronpedia's dataset export writes it (index as a string)."""
    return {"modelId": "gpt2-small", "layer": layer, "index": str(index), "description": description,
            "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini", **fields}


def test_an_empty_description_never_wins(tmp_path):
    path = _export(tmp_path / "e.jsonl", [_np(3, ""), _np(3, "French words"), _np(3, "later words"),
                                          _np(4, "   "), _np(4, "\t\n"), _np(7, "numbers", scores=[{"value": 0.2}]),
                                          _np(7, " ", scores=[{"value": 0.99}])])
    assert read_explanations(path) == {3: "French words", 7: "numbers"}  # latent 4: only empty ones, no label
    imported = read_export(path, GPT2_L6)
    assert imported.labels == {3: "French words", 7: "numbers"}
    assert imported.notes == ("ignored 4 empty explanations",)


def test_the_best_scored_explanation_wins(tmp_path):
    path = _export(tmp_path / "e.jsonl", [
        _np(5, "weakly scored", scores=[{"value": 0.05, "explanationScoreTypeName": "recall_alt"}]),
        _np(5, "well scored", scores=[{"value": 0.2, "explanationScoreTypeName": "recall_alt"},
                                      {"value": 0.9, "explanationScoreTypeName": "eleuther_fuzz"}]),
        _np(5, "scored in between", scores=[{"value": 0.5}]),
        _np(6, "unscored first"), _np(6, "scored, so better", scoreV1=0.1), _np(6, "also unscored", scores=[]),
        _np(8, "tie: the first stays", score=0.4), _np(8, "tie: the second goes", score=0.4),
        _np(9, "scoreV2 counts before scoreV1", scoreV1=0.9, scoreV2=0.3),
        _np(9, "its scoreV2 is higher", scoreV1=0.0, scoreV2=0.31),
        _np(10, "null scores count as none", scoreV2=None, scores=None), _np(10, "negative", score=-0.5),
    ])
    assert read_explanations(path) == {5: "well scored", 6: "scored, so better", 8: "tie: the first stays",
                                       9: "its scoreV2 is higher", 10: "negative"}


@pytest.mark.parametrize("fields, reason", [
    ({"score": "high"}, "'score' must hold numbers"),
    ({"score": True}, "'score' must hold numbers"),
    ({"scoreV1": float("nan")}, "finite"),
    ({"scores": 0.9}, "'scores' must be a list"),
    ({"scores": [{"value": "0.9"}]}, "'scores' must hold numbers"),
])
def test_a_score_that_is_not_a_number_is_an_error_naming_the_line(tmp_path, fields, reason):
    path = _export(tmp_path / "e.jsonl", [_np(1, "fine"), _np(1, "bad score", **fields)])
    with pytest.raises(UserError) as err:
        read_explanations(path)
    assert f"{path}, line 2: " in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)


def test_an_export_for_another_layer_is_refused_in_one_line(tmp_path):
    path = _export(tmp_path / "layer8.jsonl.gz", [_np(i, f"layer 8 latent {i}", layer="8-res-jb") for i in range(50)],
                   gz=True)
    with pytest.raises(UserError) as err:
        read_export(path, GPT2_L6)
    message = str(err.value)
    assert message == (f"{path}: an export for gpt2-small/8-res-jb, not for this SAE (gpt2-small/6-res-jb): "
                       "not imported")
    # another model with the same layer name is refused too
    other_model = _export(tmp_path / "gemma.jsonl", [{**_np(1, "x"), "modelId": "gemma-2-2b"}])
    with pytest.raises(UserError, match="an export for gemma-2-2b/6-res-jb, not for this SAE"):
        read_export(other_model, GPT2_L6)
    # the same file for the SAE it was made for
    assert len(read_export(path, LabelTarget("gpt2-small/8-res-jb", 24576)).labels) == 50


def test_a_gzipped_file_mixing_sources_keeps_this_saes_and_counts_the_rest(tmp_path):
    records = [_np(1, "mine"), _np(1, "layer 8's", layer="8-res-jb", score=1.0), _np(2, "layer 7's", layer="7-res-jb"),
               {**_np(3, "another model's"), "modelId": "gpt2-medium"}, _np(4, "mine too")]
    imported = read_export(_export(tmp_path / "mixed.jsonl.gz", records, gz=True), GPT2_L6)
    assert imported.labels == {1: "mine", 4: "mine too"}
    assert imported.notes == ("skipped 3 explanations for other SAEs (gpt2-small/8-res-jb, gpt2-small/7-res-jb, "
                              "gpt2-medium/6-res-jb)",)


def test_rows_past_d_sae_are_skipped_and_counted(tmp_path):
    path = _export(tmp_path / "e.jsonl", [_np(i, f"latent {i}") for i in range(2040, 2060)])
    imported = read_export(path, LabelTarget("gpt2-small/6-res-jb", d_sae=2048))
    assert sorted(imported.labels) == list(range(2040, 2048))
    assert imported.notes == ("skipped 12 explanations for latents past d_sae=2048",)
    assert len(read_explanations(path)) == 20  # without an SAE to check against, nothing is skipped


@pytest.mark.parametrize("pretty", [False, True])
def test_a_json_array_is_read_and_said_so(tmp_path, pretty):
    records = [_np(1, "one"), _np(1, "better one", score=0.5), _np(2, "two")]
    path = tmp_path / "api-export.json"
    path.write_text(json.dumps(records, indent=2 if pretty else None))
    imported = read_export(path, GPT2_L6)
    assert imported.labels == {1: "better one", 2: "two"}
    assert imported.notes == ("read as one JSON array (the layout of Neuronpedia's older API export), not JSON lines",)
    # a broken array: one line naming the file and where
    path.write_text(json.dumps(records)[:-3])
    with pytest.raises(UserError, match="not a valid JSON array"):
        read_export(path, GPT2_L6)
    path.write_text('[{"index": 1, "description": "ok"}, {"index": "x", "description": "bad"}]')
    with pytest.raises(UserError, match="item 2 of the array: 'index' must be an integer"):
        read_export(path, GPT2_L6)


def test_what_cannot_be_checked_is_read_and_said_so(tmp_path):
    path = _export(tmp_path / "e.jsonl", [_np(1, "one", layer="8-res-jb"), _np(2, "two", layer="8-res-jb")])
    imported = read_export(path, LabelTarget(neuronpedia_id=None, d_sae=64))
    assert imported.labels == {1: "one", 2: "two"}
    assert imported.notes == ("not checked against the SAE: it has no Neuronpedia id (it names gpt2-small/8-res-jb)",)
    bare = _export(tmp_path / "bare.jsonl", [{"index": 1, "description": "one"}, {"index": 2, "description": "two"},
                                             _np(3, "three")])
    imported = read_export(bare, GPT2_L6)
    assert imported.labels == {1: "one", 2: "two", 3: "three"}
    assert imported.notes == ("2 explanations name no modelId/layer: not checked against this SAE "
                              "(gpt2-small/6-res-jb)",)
    # unchecked rows do not rescue a file whose every named source is another SAE's: kept, the rest skipped
    mixed = _export(tmp_path / "m.jsonl", [{"index": 1, "description": "one"}, _np(2, "two", layer="8-res-jb")])
    assert read_export(mixed, GPT2_L6).labels == {1: "one"}


# ---------------------------------------------------------------------------------------------- descriptions


def test_description_format_boundaries_and_length():
    from epo_tui.demo.labels import MAX_CHARS, NEVER_FIRES, Vocabulary, describe

    words = {0: "<|endoftext|>", 1: " the", 2: " file", 3: " must", 4: " be", 5: "file", 6: " closed",
             7: " " + "x" * 70, 8: "\n"}
    vocabulary = Vocabulary(strings=[words[i] for i in range(len(words))],
                            decode=lambda ids: "".join(words[int(i)] for i in ids),
                            boundary_ids=frozenset({0, 8}))  # end of document, end of paragraph
    rows = np.array([[0, 1, 2, 3, 4, 6, 0, 5],
                     [0, 4, 0, 2, 3, 8, 7, 1]], np.int32)
    positions = np.array([2, 11, 13, 5, 0], np.int64)  # " file", " file", "\n", " closed", BOS (unused)
    values = np.array([3.0, 2.0, 1.5, 1.0, 0.0], np.float32)
    text = describe(values, positions, rows, vocabulary)
    assert text == '"file", "\\n", "closed" — e.g. "the [file] must be closed"'
    # the snippet stops at a document or paragraph boundary on either side
    text = describe(values[[1, 0]], positions[[1, 0]], rows, vocabulary)
    assert text == '"file" — e.g. "[file] must"'
    # a long context token: the snippet narrows until the description fits
    text = describe(np.array([5.0, 1.0], np.float32), np.array([13, 2]), rows, vocabulary)
    assert text == '"\\n", "file" — e.g. "must[\\n]"'
    # a long firing token: cut to fit
    text = describe(np.array([5.0, 1.0], np.float32), np.array([14, 2]), rows, vocabulary)
    assert len(text) == MAX_CHARS and text.endswith("…")
    never = describe(np.full(3, -1.0, np.float32), np.zeros(3, np.int64), rows, vocabulary)
    assert never == NEVER_FIRES


def test_snippet_shows_whole_words():
    from epo_tui.demo.labels import Vocabulary, marked_snippet

    words = ["<|endoftext|>", " Rep", "eated", " calls", " are", " equal", " to", " a", " sin", "gle"]
    vocabulary = Vocabulary(strings=words, decode=lambda ids: "".join(words[int(i)] for i in ids),
                            boundary_ids=frozenset({0}))
    row = np.arange(10)
    assert marked_snippet(row, 6, 4, 2, vocabulary) == "calls are equal [to] a"  # not "eated ... sin"
    assert marked_snippet(row, 6, 5, 3, vocabulary) == "Repeated calls are equal [to] a single"
    assert marked_snippet(row, 2, 0, 0, vocabulary) == "[eated]"


# ---------------------------------------------------------------------------------------------- the builder

HOOK = "blocks.1.hook_resid_pre"
D_SAE = 48
DEAD = (5, 17)
TRAIN_WORDS = "the quick brown fox over lazy dog hello world this is a tiny model animals shelter need homes".split()
MARKER = "QXZJ"  # only in the held-out split


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(TRAIN_WORDS, size=rng.integers(6, 30))) + "." for _ in range(n)]


def _write_split(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"name": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


def _parse(description: str) -> tuple[list[str], str]:
    tokens, snippet = description.rsplit(" — e.g. ", 1)
    return json.loads(f"[{tokens}]"), json.loads(snippet)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """A tiny pack: random GPT-2, a random standard SAE (two latents that never fire), a corpus whose
    held-out split is all MARKER; then the labels stage."""
    from epo_tui.config import ModelConfig
    from epo_tui.demo.labels import build_labels
    from epo_tui.demo.train_sae import SAEResult, SAESpec, collect, save_sae
    from epo_tui.engine.language_model import load_model
    from epo_tui.engine.tiny import write_tiny_checkpoint

    out = tmp_path_factory.mktemp("labels_pack")
    write_tiny_checkpoint(out / "model")
    _write_split(out / "corpus" / "train.jsonl", _texts(80, seed=0))
    _write_split(out / "corpus" / "heldout.jsonl", [" ".join([MARKER] * 40) + "."] * 30)
    # centred on the activations and scaled so pre-activations have unit spread: latents are selective
    lm = load_model(ModelConfig(name=None, path=str(out / "model")))
    acts = collect(lm, _texts(80, seed=0), HOOK, max_tokens=None)
    rng = np.random.default_rng(0)
    W_enc = (rng.normal(size=(32, D_SAE)) / np.linalg.norm(acts.std(0))).astype(np.float32)
    b_enc = np.full(D_SAE, -1.0, np.float32)
    b_enc[list(DEAD)] = -1e4
    result = SAEResult(W_enc_DxS=W_enc, b_enc_S=b_enc, W_dec_SxD=W_enc.T.copy(), b_dec_D=acts.mean(0),
                       scale=1.0, history=[], resampled=[])
    save_sae(out / "sae", result, replace(SAESpec(), hook_name=HOOK, d_sae=D_SAE), np.full(D_SAE, 0.1),
             model_name="tiny-demo")
    stats = build_labels(out, log=lambda *_: None)
    return out, stats


def _records(out: Path) -> list[dict]:
    lines = (out / "labels" / "explanations.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_one_explanation_per_latent_in_neuronpedia_layout(pack):
    from epo_tui.demo.labels import EXPLAINER, MAX_CHARS, NEVER_FIRES, TYPE_NAME

    out, stats = pack
    records = _records(out)
    assert len(records) == D_SAE == stats["latents"]
    assert stats["never_fired"] == len(DEAD) and stats["rows"] > 5
    for index, record in enumerate(records):
        assert tuple(record) == EXPORT_KEYS
        assert record["modelId"] == "tiny-demo" and record["layer"] == "1-res-demo"
        assert record["index"] == str(index)
        assert record["typeName"] == TYPE_NAME and record["explanationModelName"] == EXPLAINER
        assert record["automatic"] is True
        assert isinstance(record["description"], str) and 0 < len(record["description"]) <= MAX_CHARS
        assert (record["description"] == NEVER_FIRES) == (index in DEAD)
    assert read_explanations(out / "labels" / "explanations.jsonl") == {
        i: r["description"] for i, r in enumerate(records)}
    # the SAE carries the id its labels name, so they pass the check against it
    from epo_tui.demo.labels import load_pair

    sae = load_pair(out).sae
    assert sae.neuronpedia_id == "tiny-demo/1-res-demo"
    checked = read_export(out / "labels" / "explanations.jsonl", LabelTarget(sae.neuronpedia_id, sae.d_sae))
    assert len(checked.labels) == D_SAE and checked.notes == ()


def test_descriptions_name_the_tokens_at_each_latents_top_activations(pack):
    """Recomputed independently: SAE encoding and top-k in numpy, tokens decoded one by one."""
    from epo_tui.demo.corpus import read_split
    from epo_tui.demo.labels import TOP_K, display_token, load_pair, top_activations, train_rows
    from epo_tui.demo.train_sae import load_saved_arrays

    out, _ = pack
    pair = load_pair(out)
    tokens, valid = train_rows(pair, read_split(out / "corpus" / "train.jsonl"))
    _, sae_in = pair.forward(tokens, logits=False)
    w = load_saved_arrays(out / "sae")
    x_PxD = np.asarray(sae_in, np.float64)[valid]
    acts_PxS = np.maximum((x_PxD - w["b_dec_D"]) @ w["W_enc_DxS"] + w["b_enc_S"], 0.0)
    token_at = np.array(pair.model.token_strings(tokens[valid]), dtype=object)
    engine_top = top_activations(pair, tokens, valid, batch_rows=3)  # several batches, a padded last one
    for index, record in enumerate(_records(out)):
        if index in DEAD:
            continue
        order = np.argsort(-acts_PxS[:, index], kind="stable")[:TOP_K]
        order = order[acts_PxS[order, index] > 0]
        np.testing.assert_allclose(engine_top.values_SxK[index, :len(order)], acts_PxS[order, index], rtol=1e-4,
                                   atol=1e-4)
        assert np.all(engine_top.values_SxK[index, len(order):] <= 0)
        shown = [display_token(t) for t in token_at[order]]
        quoted, snippet = _parse(record["description"])
        counts = Counter(shown)
        assert quoted and set(quoted) <= set(shown)
        assert min(counts[q] for q in quoted) >= max([c for t, c in counts.items() if t not in quoted], default=0)
        assert f"[{shown[0]}]" in snippet  # the snippet marks the single strongest activation


def test_activations_match_the_searchs_score_text(pack):
    from epo_tui.demo.corpus import read_split
    from epo_tui.demo.labels import load_pair, top_activations, train_rows
    from epo_tui.engine.scoring import score_text

    out, _ = pack
    pair = load_pair(out)
    tokens, valid = train_rows(pair, read_split(out / "corpus" / "train.jsonl"))
    top = top_activations(pair, tokens, valid)
    special = set(pair.model.special_token_ids().tolist())
    compared = 0
    for index in range(pair.sae.d_sae):
        row, column = divmod(int(top.positions_SxK[index, 0]), tokens.shape[1])
        assert int(tokens[row, column]) not in special  # a maximum never sits on a separator
        if special & set(tokens[row, 1:column + 1].tolist()):
            continue  # the context spans a document separator, which no text to score can hold
        text = pair.model.decode(tokens[row, 1:column + 1])
        scored = score_text(pair, text, index)
        assert scored["token_ids"] == tokens[row, :column + 1].tolist()
        assert scored["activations"][-1] == pytest.approx(float(top.values_SxK[index, 0]), abs=1e-4)
        compared += 1
        if compared == 3:
            break
    assert compared == 3


def test_labels_come_from_train_text_only(pack):
    from epo_tui.demo.corpus import read_split
    from epo_tui.demo.labels import explanation_records, load_pair, top_activations, train_rows

    out, _ = pack
    assert not any(letter in r["description"] for r in _records(out) for letter in MARKER)
    # control: labelled from the held-out split, the marker would show
    pair = load_pair(out)
    tokens, valid = train_rows(pair, read_split(out / "corpus" / "heldout.jsonl"))
    heldout_records = explanation_records(pair, top_activations(pair, tokens, valid), tokens)
    assert any(MARKER in r["description"] for r in heldout_records)


def test_a_second_build_writes_identical_bytes(pack, tmp_path):
    import shutil

    from epo_tui.demo.labels import build_labels

    out, _ = pack
    copy = tmp_path / "pack"
    for part in ("model", "sae", "corpus"):
        shutil.copytree(out / part, copy / part)
    build_labels(copy, log=lambda *_: None)
    assert (copy / "labels" / "explanations.jsonl").read_bytes() == (out / "labels" / "explanations.jsonl").read_bytes()


@pytest.mark.parametrize("line, message", [
    ('{"index": "1' + "0" * 5000 + '", "description": "x"}', "'index' must be an integer or a string of digits"),
    ("[" * 200_000, "not an explanations array (JSON nested too deep)"),
    ('{"index": 1, "description": ' + "[" * 200_000 + "}", "not an explanation (JSON nested too deep)"),
])
def test_a_damaged_export_is_one_line_not_a_crash(tmp_path, line, message):
    """Found by trying it: a 5000-digit index (int() refuses it) or JSON nested 200,000 deep (a
    RecursionError) ended in an internal error in the CLI and the worker, and closed the UI."""
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError) as caught:
        read_export(path)
    assert message in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 300

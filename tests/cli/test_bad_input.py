"""Issue 7 §1, bad configs: every bad config is one clear line naming the file and key, exit code 2,
no traceback, nothing written. Property tests call the loader in-process (random and mutated TOML from
the shipped samples and the tiny config, random plain data, random bytes); a handful of cases run the
real CLI; SAEs and checkpoints that do not fit or do not load go through `epo-tui score`.

tests/cli/test_bad_input_text.py covers texts, feature indices and the worker's stdin."""

from __future__ import annotations

import dataclasses
import math
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import run_cli
from refusals import assert_one_clear_line, assert_refused, edit_checkpoint, written_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epo_tui import paths
from epo_tui.config import INT_MAX, INT_MIN, SECTIONS, Config, config_from_data, load_config, parse_config
from epo_tui.engine.tiny import write_config, write_tiny_checkpoint
from epo_tui.errors import ConfigError, UserError

SAMPLES = {name: path.read_text() for name, path in paths.sample_configs().items()}
KEYS = {section: [f.name for f in dataclasses.fields(cls)] for section, cls in SECTIONS.items()}


def _tiny_config_text(tmp: Path) -> str:
    """The text the tiny helper writes (its config.toml), without building the model."""
    return write_config(tmp / "tiny.toml", "model", "sae", feature=5, iterations=20, elites=4, candidates=16,
                        prompt_tokens=6, topk=32).read_text()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[str]:
    return [*SAMPLES.values(), _tiny_config_text(tmp_path_factory.mktemp("tinycfg"))]


# ----------------------------------------------------------------------------------------------
# What every outcome must look like


def assert_within_limits(config: Config) -> None:
    """A config that loads obeys every documented limit: finite numbers, 64-bit integers, choices, minima."""
    for section in SECTIONS:
        values = getattr(config, section)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                if isinstance(item, float):
                    assert math.isfinite(item), (section, f.name, item)
                if isinstance(item, int) and not isinstance(item, bool):
                    assert INT_MIN <= item <= INT_MAX, (section, f.name, item)
                limits = f.metadata
                if limits.get("choices"):
                    assert item in limits["choices"]
                if limits.get("min") is not None:
                    assert item >= limits["min"], (section, f.name, item)
                if limits.get("max") is not None:
                    assert item <= limits["max"], (section, f.name, item)
    assert 0 < config.search.penalty_min <= config.search.penalty_max


def outcome(load, source: str) -> str:
    """Loads; returns 'ok' or 'error' after checking the config or the message. Any other exception fails."""
    try:
        config = load()
    except ConfigError as err:
        assert_one_clear_line(str(err), source)
        return "error"
    assert_within_limits(config)
    return "ok"


# ----------------------------------------------------------------------------------------------
# Strategies: TOML literals (good and bad), keys, mutations of real configs

FLOATS = st.floats(allow_nan=True, allow_infinity=True)
WEIRD_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "\x1b[31mred", "a\nb", "\x00", "~nosuchuser/x", "~/x", "/", "..", "sample:x", "\u202e", "[/]"])


def _toml_float(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else repr(x)


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, but for surrogates and DEL, which TOML refuses:
    they then make invalid TOML, which is a fine bad input too)."""
    import json

    return json.dumps(text)


SCALARS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from([str(INT_MAX), str(INT_MAX + 1), str(INT_MIN), str(INT_MIN - 1), "0", "-1", "1", "10**9"]),
    FLOATS.map(_toml_float),
    WEIRD_TEXT.map(_toml_string),
    st.sampled_from(["true", "false", "1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "0x7f", "0o17",
                     "0b101", "1_000", "'literal'", "'''multi\nline'''", '"""x"""', "{}", "[]"]),
)
LITERALS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
    | st.dictionaries(st.sampled_from(["a", "index", "path", "x"]), inner, max_size=2).map(
        lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"),
    max_leaves=5,
)
REAL_KEYS = st.sampled_from(sorted({k for keys in KEYS.values() for k in keys}))
ANY_KEY = REAL_KEYS | st.text(string.ascii_letters + "_-", min_size=1, max_size=8) | WEIRD_TEXT.filter(bool).map(
    _toml_string)
SECTION_NAMES = st.sampled_from([*SECTIONS, "serch", "Model", "model.extra", "[x]", "feature.sub"])
GARBAGE_LINES = st.sampled_from(["[", "]]", "= 1", "key =", "[model", "a = 1 = 2", "\"unterminated", "[[search]]",
                                 "model = 3", "\t", "#", "x.y.z = 1", "search.iterations = 3"]) | st.text(max_size=20)


@st.composite
def mutated_toml(draw, bases_: list[str]) -> str:
    lines = draw(st.sampled_from(bases_)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines)))
        op = draw(st.sampled_from(["delete", "retype", "insert_key", "insert_section", "garbage", "duplicate",
                                   "truncate"]))
        if op == "delete" and i < len(lines):
            del lines[i]
        elif op == "retype":
            assignments = [j for j, line in enumerate(lines) if "=" in line and not line.lstrip().startswith("#")]
            if assignments:
                j = draw(st.sampled_from(assignments))
                lines[j] = lines[j].split("=")[0] + "= " + draw(LITERALS)
        elif op == "insert_key":
            lines.insert(i, f"{draw(ANY_KEY)} = {draw(LITERALS)}")
        elif op == "insert_section":
            lines.insert(i, f"[{draw(SECTION_NAMES)}]")
        elif op == "garbage":
            lines.insert(i, draw(GARBAGE_LINES))
        elif op == "duplicate" and i < len(lines):
            lines.insert(i, lines[i])
        elif op == "truncate":
            text = "\n".join(lines)
            lines = text[: draw(st.integers(0, len(text)))].splitlines()
    return "\n".join(lines) + "\n"


@st.composite
def sectioned_toml(draw) -> str:
    """Only real sections and keys, each with a random literal: mostly type and range errors."""
    out = []
    for section in draw(st.lists(st.sampled_from(list(SECTIONS)), unique=True, min_size=1, max_size=5)):
        out.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(KEYS[section]), unique=True, max_size=4)):
            out.append(f"{key} = {draw(LITERALS)}")
    return "\n".join(out) + "\n"


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | FLOATS | WEIRD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(REAL_KEYS | WEIRD_TEXT, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def config_data(draw):
    """Plain data as a client or a session sends it: real sections and keys with random values, sometimes
    unknown ones, sometimes not a table at all."""
    doc = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "extra"]), unique=True, max_size=5)):
        keys = KEYS.get(section, ["x"])
        doc[section] = draw(st.dictionaries(st.sampled_from(keys) | WEIRD_TEXT, JSONISH, max_size=4)
                            | JSONISH)
    return draw(st.just(doc) | JSONISH)


# ----------------------------------------------------------------------------------------------
# Property tests: the loader in-process (counts tried: see max_examples)

def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_the_shipped_and_tiny_configs_load_unchanged(bases):
    for text in bases:  # the starting points are good: every failure below comes from a mutation
        assert outcome(lambda: parse_config(text, source="base.toml"), "base.toml") == "ok"


@examples(400)
@given(data=st.data())
def test_mutated_real_configs_load_or_fail_in_one_line(bases, data):
    text = data.draw(mutated_toml(bases))
    outcome(lambda: parse_config(text, source="mutated.toml"), "mutated.toml")


@examples(300)
@given(text=sectioned_toml())
def test_real_keys_with_random_values_load_or_fail_in_one_line(text):
    outcome(lambda: parse_config(text, source="typed.toml"), "typed.toml")


@examples(300)
@given(document=config_data())
def test_random_plain_data_loads_or_fails_in_one_line(document):
    outcome(lambda: config_from_data(document, source="<client>"), "<client>")


@examples(150)
@given(raw=st.binary(max_size=200) | st.sampled_from(list(SAMPLES.values())).map(str.encode).flatmap(
    lambda good: st.tuples(st.integers(0, len(good)), st.binary(min_size=1, max_size=8)).map(
        lambda cut: good[: cut[0]] + cut[1] + good[cut[0]:])))
def test_random_bytes_in_a_file_load_or_fail_in_one_line(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "bytes.toml"
    path.write_bytes(raw)
    outcome(lambda: load_config(str(path)), str(path))


@pytest.mark.parametrize("text, key", [
    ("[search]\npenalty_min = nan\n", "search.penalty_min: expected a finite number, found nan"),
    ("[search]\npenalty_max = inf\n", "search.penalty_max: expected a finite number, found inf"),
    ("[feature]\nlp_offset = -inf\n", "feature.lp_offset: expected a finite number, found -inf"),
    ("[search]\nseed = 9223372036854775808\n", "search.seed: 9223372036854775808 does not fit in a 64-bit integer"),
    ("[feature]\nindices = [1, 99999999999999999999]\n", "feature.indices[1]: 99999999999999999999 does not fit"),
    ('[search]\n"a\\nb\\u001b[31m" = 1\n', "search.a\\nb\\x1b[31m: unknown key"),
    ('["x\\ny"]\n', "x\\ny: unknown section"),
    ('[model]\ndtype = "f\\n\\u0007"\n', "model.dtype: 'f\\n\\x07' is not one of auto, float32, bfloat16"),
    ("[search]\nswap = 1.5\n", "search.swap: must be <= 1.0, found 1.5"),
    ("[search]\nbanned_tokens = [1, 2]\n", "search.banned_tokens[0]: expected a string, found 1 (integer)"),
    ("[feature]\nindices = \"1,2\"\n", "feature.indices: expected an array, found '1,2' (string)"),
    ("[search]\nprefix = []\n", "search.prefix: expected a string, found array"),
    ("[feature]\nindex = 1979-05-27\n", "feature.index: expected an integer, found datetime.date(1979, 5, 27) (date)"),
    ("model = [1]\n", "model: expected a table [model], found array"),
])
def test_fixed_bad_values_name_the_key(text, key):
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="fixed.toml")
    assert_one_clear_line(str(info.value), "fixed.toml")
    assert key in str(info.value)


def test_unknown_home_directory_in_a_path_is_left_as_written(tmp_path):
    config = parse_config('[model]\npath = "~nosuchuser-epo/m"\n[sae]\npath = "~nosuchuser-epo/s"\n',
                          source="t.toml", base_dir=tmp_path)
    assert config.model.path == str(tmp_path / "~nosuchuser-epo/m")  # as a shell leaves an unknown ~user
    assert config_from_data({"favorites": {"path": "~nosuchuser-epo/f.md"}}).favorites.path == "~nosuchuser-epo/f.md"


def test_missing_file_directory_and_unknown_user_through_load_config(tmp_path):
    for spec, message in [(str(tmp_path / "nope.toml"), "no such file"), (str(tmp_path), "is a folder"),
                          ("~nosuchuser-epo/c.toml", "no such file")]:
        with pytest.raises(UserError) as info:
            load_config(spec)
        assert_one_clear_line(str(info.value), "--config")
        assert message in str(info.value)


# ----------------------------------------------------------------------------------------------
# Through the CLI: exit 2, one line on stderr, no traceback, nothing written


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _bad_configs(folder: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name: (--config argument, what the message must name)."""
    def write(name: str, data: bytes) -> str:
        path = folder / f"{name}.toml"
        path.write_bytes(data)
        return str(path)

    return {
        "missing file": ([str(folder / "nope.toml")], ("--config", "no such file")),
        "a directory": ([str(folder)], ("--config", "is a folder")),
        "invalid TOML": ([write("invalid", b"[search\nelites = 3\n")], ("invalid.toml", "invalid TOML at line 1")),
        "random bytes": ([write("bytes", b"\xff\xfe\x00[\x9b\x1b[2J")], ("bytes.toml", "not valid UTF-8")),
        "escape in a key": ([write("esc", b'[search]\n"\\u001b[2J\\nx" = 1\n')], ("esc.toml", "\\x1b[2J\\nx")),
        "NaN penalty": ([write("nan", b"[search]\npenalty_min = nan\n")], ("nan.toml", "search.penalty_min")),
        "huge seed": ([write("seed", b"[search]\nseed = 99999999999999999999\n")], ("seed.toml", "search.seed")),
        "unknown sample": (["sample:gpt3"], ("--config", "no sample config named 'gpt3'")),
    }


CLI_CASES = ["missing file", "a directory", "invalid TOML", "random bytes", "escape in a key", "NaN penalty",
             "huge seed", "unknown sample"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_config_through_the_cli(in_tmp, case):
    argv, needles = _bad_configs(in_tmp)[case]
    before = written_files()
    assert_refused(*run_cli("score", "--config", *argv, "hello"), *needles)
    assert written_files() == before


@pytest.mark.parametrize("command", [["score", "hello"], ["run", "--iterations", "1"], ["features"]])
def test_bad_config_in_a_real_process(in_tmp, command):
    bad = in_tmp / "bad.toml"
    bad.write_bytes(b'[search]\nseed = nan\n[\x1b]\n')
    before = written_files()
    proc = subprocess.run([sys.executable, "-m", "epo_tui", command[0], "--config", str(bad), *command[1:]],
                          capture_output=True, text=True, timeout=60, cwd=in_tmp)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, "bad.toml", "invalid TOML")
    assert written_files() == before


# ----------------------------------------------------------------------------------------------
# SAEs and checkpoints that do not fit the model, or do not load (the tiny model, in-process)


def _pair_config(folder: Path, model: Path | str, sae: Path | str, feature: int = 0) -> str:
    path = folder / "pair.toml"
    path.write_text(f'[model]\npath = "{model}"\n[sae]\npath = "{sae}"\n[feature]\nindex = {feature}\n')
    return str(path)


def _broken_pairs(tiny: Path, folder: Path) -> dict:
    from epo_tui.engine.sae_writer import write_random_sae

    def copy(what: str, name: str) -> Path:
        return Path(shutil.copytree(tiny / what, folder / name))

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    deep = write_random_sae(folder / "deep", d_in=32, d_sae=16, hook_name="blocks.5.hook_resid_pre")
    narrow = write_random_sae(folder / "narrow", d_in=16, d_sae=16, hook_name="blocks.1.hook_resid_pre")
    odd_hook = write_random_sae(folder / "odd", d_in=32, d_sae=16, hook_name="blocks.1.hook_nonsense")
    bad_json = copy("sae", "sae-json")
    (bad_json / "cfg.json").write_text('{"d_in": ')
    short_sae = copy("sae", "sae-short")
    truncate(short_sae / "sae_weights.safetensors")
    short_model = copy("model", "model-short")
    truncate(short_model / "model.safetensors")
    gemma_headless = write_tiny_checkpoint(folder / "gemma-headless", "gemma", tie_word_embeddings=False)
    edit_checkpoint(gemma_headless, drop="lm_head.weight")
    gpt2_headless = edit_checkpoint(copy("model", "gpt2-headless"), tie_word_embeddings=False)
    deeper = edit_checkpoint(copy("model", "deeper"), n_layer=3)  # the weights hold 2 layers
    longer = edit_checkpoint(copy("model", "longer"), n_positions=256)  # wpe holds 128 rows
    three_heads = edit_checkpoint(copy("model", "three-heads"), n_head=3)  # 32 wide: 3 heads do not divide it
    no_heads = edit_checkpoint(copy("model", "no-heads"), n_head=0)
    tie_yes = edit_checkpoint(copy("model", "tie-yes"), tie_word_embeddings="yes")
    sae, model = tiny / "sae", tiny / "model"
    return {
        "heads that do not divide d_model": (three_heads, sae, (
            str(three_heads), "3 attention heads, which do not divide its hidden size 32")),
        "zero heads": (no_heads, sae, (str(no_heads), "n_heads = 0: it must be a positive integer")),
        "tie_word_embeddings not a bool": (tie_yes, sae, (str(tie_yes), "cannot read the config or tokenizer")),
        "SAE hook past the last layer": (model, deep, ("sae: hook 'blocks.5.hook_resid_pre' is not in the model",)),
        "SAE narrower than the model": (model, narrow, ("sae: the SAE reads 16-wide activations", "has d_model = 32 there")),
        "SAE on an unknown hook point": (model, odd_hook, ("sae: unknown hook point 'hook_nonsense'",)),
        "SAE cfg.json not JSON": (model, bad_json, ("pair.toml", "sae.path", "JSONDecodeError")),
        "SAE weights truncated": (model, short_sae, ("pair.toml", "sae.path", "SafetensorError")),
        "model weights truncated": (short_model, sae, ("cannot read the weights", "model.safetensors")),
        "Gemma untied without lm_head": (gemma_headless, sae, (
            str(gemma_headless), "no tensor 'lm_head.weight'", "(tie_word_embeddings: false)")),
        "GPT-2 untied without lm_head": (gpt2_headless, sae, (
            str(gpt2_headless), "no tensor 'lm_head.weight'", "(tie_word_embeddings: false)")),
        "config deeper than the weights": (deeper, sae, (
            str(deeper), "no tensor 'transformer.h.2.ln_1.weight'", "(n_layer: 3)")),
        "tensor shape not the config's": (longer, sae, (
            str(longer), "tensor 'transformer.wpe.weight' of shape (128, 32)",
            "config gives (n_positions, n_embd) = (256, 32)")),
        "model folder is the SAE": (sae, sae, ("model.path", "no config.json")),
        "SAE folder is the model": (model, model, ("sae.path", "not a sae-lens SAE folder")),
        "model folder missing": (folder / "nope", sae, ("model.path", "not a checkpoint folder")),
        "unknown home directory": ("~nosuchuser-epo/m", sae, ("model.path", "~nosuchuser-epo/m")),
        "feature past the SAE": (model, sae, ("pair.toml", "feature.index: 64 is out of range")),
    }


PAIR_CASES = ["SAE hook past the last layer", "SAE narrower than the model", "SAE on an unknown hook point",
              "SAE cfg.json not JSON", "SAE weights truncated", "model weights truncated", "model folder is the SAE",
              "SAE folder is the model", "model folder missing", "unknown home directory", "feature past the SAE",
              "Gemma untied without lm_head", "GPT-2 untied without lm_head", "config deeper than the weights",
              "tensor shape not the config's", "heads that do not divide d_model", "zero heads",
              "tie_word_embeddings not a bool"]


@pytest.fixture(scope="module")
def broken_pairs(tiny_dir, tmp_path_factory):
    return _broken_pairs(tiny_dir, tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("case", PAIR_CASES)
def test_sae_or_model_that_does_not_fit_or_load(in_tmp, broken_pairs, case):
    model, sae, needles = broken_pairs[case]
    feature = 64 if case == "feature past the SAE" else 0
    config = _pair_config(in_tmp, model, sae, feature)
    before = written_files()
    code, out, err = run_cli("score", "--config", config, "hello")
    assert_refused(code, out, err, *needles)
    assert written_files() == before

"""Config loading: lookup order, every key, and one clear error per kind of bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from epo_tui import paths
from epo_tui.cli import main
from epo_tui.config import Config, ModelConfig, SAEConfig, field_help, load_config, parse_config
from epo_tui.errors import ConfigError, UserError

FULL = """
[model]
name = "gpt2"
dtype = "bfloat16"
[sae]
release = "gpt2-small-res-jb"
id = "blocks.8.hook_resid_pre"
[feature]
index = 234
[search]
iterations = 750
elites = 8
candidates = 128
prompt_tokens = 20
penalty_min = 1.0
penalty_max = 20.0
topk = 128
seed = 0
prefix = "<start_of_turn>user\\n"
"""


def test_every_documented_key_is_read():
    config = parse_config(FULL, source="full.toml")
    assert config.model == ModelConfig(name="gpt2", path=None, dtype="bfloat16")
    assert config.sae == SAEConfig(release="gpt2-small-res-jb", id="blocks.8.hook_resid_pre", path=None)
    assert config.feature.index == 234
    s = config.search
    assert (s.iterations, s.elites, s.candidates, s.prompt_tokens, s.topk, s.seed) == (750, 8, 128, 20, 128, 0)
    assert (s.penalty_min, s.penalty_max) == (1.0, 20.0)
    assert s.prefix == "<start_of_turn>user\n"


def test_defaults_are_gpt2_small_with_res_jb(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config = load_config(None)
    assert config == Config()
    assert config.model.name == "gpt2" and config.sae.release == "gpt2-small-res-jb"
    assert config.source == "built-in defaults"


def test_user_config_file_is_found_by_platformdirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    user_file = paths.default_config_file()
    assert user_file == tmp_path / "epo-tui" / "config.toml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("[feature]\nindex = 7\n")
    config = load_config(None)
    assert config.feature.index == 7 and config.source == str(user_file)


def test_explicit_path_wins_over_user_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    paths.default_config_file().parent.mkdir(parents=True)
    paths.default_config_file().write_text("[feature]\nindex = 7\n")
    explicit = tmp_path / "mine.toml"
    explicit.write_text("[feature]\nindex = 9\n")
    assert load_config(str(explicit)).feature.index == 9


@pytest.mark.parametrize("name", ["gpt2-small-res-jb", "gemma-2b-it-res-jb", "gemma-2-2b-gemma-scope"])
def test_shipped_samples_load(name):
    config = load_config(f"sample:{name}")
    assert config.source.endswith(f"{name}.toml")
    assert config.sae.release and config.sae.id and config.model.name


def test_gpt2_sample_is_the_seed_feature():
    config = load_config("sample:gpt2-small-res-jb")
    assert (config.sae.id, config.feature.index) == ("blocks.10.hook_resid_pre", 234)


def test_gemma_it_sample_uses_the_chat_prefix():
    assert load_config("sample:gemma-2b-it-res-jb").search.prefix == "<start_of_turn>user\n"


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\npath = "m"\n[sae]\npath = "../s"\n')
    config = load_config(str(tmp_path / "c.toml"))
    assert config.model == ModelConfig(name=None, path=str(tmp_path / "m"), dtype="auto")
    assert config.sae == SAEConfig(release=None, id=None, path=str(tmp_path / "../s"))


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="my.toml")
    return str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("[search]\niterations = \n", "my.toml: invalid TOML at line 2, column 14: "),
    ("[model\n", "my.toml: invalid TOML at line 1, column 7"),
    ("[serch]\n", "my.toml: serch: unknown section; did you mean 'search'?"),
    ("[search]\niteration = 5\n", "my.toml: search.iteration: unknown key; did you mean 'iterations'?"),
    ("[search]\niterations = \"many\"\n",
     "my.toml: search.iterations: expected an integer, found 'many' (string)"),
    ("[search]\niterations = true\n", "my.toml: search.iterations: expected an integer, found True (boolean)"),
    ("[search]\niterations = 1.5\n", "my.toml: search.iterations: expected an integer, found 1.5 (number)"),
    ("[search]\nelites = 0\n", "my.toml: search.elites: must be >= 1, found 0"),
    ("[feature]\nindex = -3\n", "my.toml: feature.index: must be >= 0, found -3"),
    ("[model]\ndtype = \"bfloat61\"\n",
     "my.toml: model.dtype: 'bfloat61' is not one of auto, float32, bfloat16; did you mean 'bfloat16'?"),
    ("[model]\nname = \"gpt2\"\npath = \"/x\"\n",
     "my.toml: model.name: give either model.path or model.name, not both"),
    ("[sae]\nrelease = \"gpt2-small-res-jb\"\n",
     "my.toml: sae.id: missing; sae.release needs sae.id too"),
    ("[search]\npenalty_min = 5.0\npenalty_max = 2.0\n",
     "my.toml: search.penalty_min: 5.0 is larger than search.penalty_max (2.0)"),
    ("[search]\npenalty_min = 0\n", "my.toml: search.penalty_min: must be > 0 (penalties are log-spaced), found 0.0"),
    ("search = 3\n", "my.toml: search: expected a table [search], found 3 (integer)"),
])
def test_bad_config_errors_name_file_key_found_and_allowed(text, expected):
    assert _error(text).startswith(expected)


def test_unknown_key_lists_what_is_allowed():
    message = _error("[search]\nbanana = 1\n")
    assert "allowed in [search]: iterations, time_budget, elites, candidates" in message


def test_invalid_utf8_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[search]\nprefix = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(str(bad))


def test_missing_config_file():
    with pytest.raises(UserError, match="--config: no such file '/nonexistent/x.toml'"):
        load_config("/nonexistent/x.toml")


def test_unknown_sample_suggests_close_names():
    with pytest.raises(UserError, match="did you mean 'gpt2-small-res-jb'"):
        load_config("sample:gpt2-small-res")


def test_cli_config_error_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "c.toml"
    bad.write_text("[search]\nelites = -1\n")
    before = sorted(tmp_path.rglob("*"))
    assert main(["score", "--config", str(bad), "hello"]) == 2
    err = capsys.readouterr().err
    assert err == f"epo-tui: error: {bad}: search.elites: must be >= 1, found -1\n"
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_cli_errors_have_no_traceback_in_a_real_process(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[model]\nname = 'gpt2'\n[model]\n")
    proc = subprocess.run([sys.executable, "-m", "epo_tui", "features", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "invalid TOML at line 3, column" in proc.stderr and proc.stdout == ""


def test_cli_bad_arguments_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["score", "--feature", "abc", "hello"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'abc'" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "c.toml"
    bad.write_text("[search]\nelites = -1\n")
    assert main(["score", "--debug", "--config", str(bad), "hello"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_samples_comment_on_a_search_key_is_the_keys_help_from_the_schema():
    value_notes = {"prefix"}  # there a sample says why its value is what it is (a chat model or not)
    checked = 0
    for name, path in paths.sample_configs().items():
        section = None
        for line in path.read_text().splitlines():
            header = re.match(r"\[(\w+)\]", line)
            section = header.group(1) if header else section
            key = re.match(r"(\w+) = [^#]*#\s*(.*)$", line)
            if section == "search" and key and key.group(1) not in value_notes:
                assert key.group(2) == field_help("search", key.group(1)), f"{name}: {line}"
                checked += 1
    assert checked >= 8

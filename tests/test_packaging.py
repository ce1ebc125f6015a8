"""themes/, sample_configs/ and the demo pack reach users who install the wheel (not editable)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_themes_and_samples_and_finds_them_at_run_time(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("epo_tui-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ["themes/dark.toml", "themes/light.toml", "sample_configs/gpt2-small-res-jb.toml",
                    "sample_configs/gemma-2b-it-res-jb.toml", "sample_configs/gemma-2-2b-gemma-scope.toml"]:
        assert f"epo_tui/{shipped}" in names
    for shipped in ["config.toml", "NOTICE.md", "heldout.jsonl", "explanations.jsonl", "model/model.safetensors",
                    "model/tokenizer.json", "sae/cfg.json", "sae/sae_weights.safetensors"]:
        assert f"epo_tui/demo/pack/{shipped}" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    code = ("import epo_tui.paths as p, epo_tui.themes as t, epo_tui.config as c;"
            "print(p.__file__); print(sorted(p.sample_configs())); print(sorted(t.available_themes()));"
            "print(c.load_config('sample:gpt2-small-res-jb').feature.index);"
            "print(c.load_config(str(p.demo_config_file())).sae.path)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(str(target))
    assert lines[1] == ("['gemma-2-2b-gemma-scope', 'gemma-2b-it-res-jb', 'gemma-3-1b-it-transcoder', "
                        "'gemma-3-1b-pt-gemma-scope-2', 'gpt2-small-res-jb', 'llama-3.1-8b-llama-scope', "
                        "'pythia-70m-deduped-res-sm']")
    assert lines[2] == "['epo-dark', 'epo-light']"
    assert lines[3] == "234"
    assert lines[4] == str(target / "epo_tui" / "demo" / "pack" / "sae")


def test_every_file_the_readmes_link_to_exists():
    """The README's screenshots are the snapshot tests' SVGs and its links name docs in the package: a
    renamed test or file must not leave a picture or a link broken."""
    import re

    for readme in [REPO / "README.md", *sorted((REPO / "epo_tui").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", readme.read_text()):
            if "://" not in target:
                assert (readme.parent / target).exists(), f"{readme.relative_to(REPO)} links to {target}"

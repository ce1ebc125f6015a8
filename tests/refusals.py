"""What a refused bad input looks like (exit code 2, one clear line, nothing written), and bad inputs
made from good ones."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from epo_tui import paths
from epo_tui.text import inert


def assert_one_clear_line(message: str, mentions: str) -> None:
    """Non-empty, one line, nothing a terminal would act on, naming the file (or the option)."""
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, repr(message)
    assert inert(message) == message, f"control characters in {message!r}"
    assert mentions in message, f"{mentions!r} not named in {message!r}"


def assert_refused(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert re.match(r"epo-tui( [a-z]+)?: error: ", err) and "Traceback" not in err  # argparse names the command
    assert_one_clear_line(err[:-1], needles[0] if needles else "")
    for needle in needles[1:]:
        assert needle in err, (needle, err)


def written_files() -> set[str]:
    """Every file under the data and cache folders but the converted-SAE and compilation caches (inputs
    that loaded fine may be cached), and under the working folder (./epo-runs)."""
    roots = [paths.data_dir(), paths.cache_dir(), Path.cwd()]
    skip = {paths.cache_dir() / "saes", paths.cache_dir() / "jax"}
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
            found.update(str(Path(dirpath, name)) for name in [*filenames, *dirnames])
    return found


def edit_checkpoint(folder: Path, drop: str | None = None, **config_changes) -> Path:
    """The checkpoint in `folder` without the tensor `drop`, and with `config_changes` in config.json."""
    from safetensors.numpy import load_file, save_file

    if drop is not None:
        tensors = load_file(folder / "model.safetensors")
        del tensors[drop]
        save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder

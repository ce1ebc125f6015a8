"""favorites.md: the exact entry users read, entries no token can break, and appends that never lose
what was saved before, even from two processes at once or on a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from epo_tui import atomic, favorites, paths
from epo_tui.config import Config, parse_config
from epo_tui.errors import UserError
from epo_tui.favorites import MARKER, append_favorite, favorite_from_elite, favorites_path, read_favorites, \
    render_entry
from epo_tui.sessions import create_session
from epo_tui.text import inert


def _fav(**changes) -> dict:
    fav = {"features": [234], "label": "Golden Gate Bridge <b>", "model": "gpt2", "sae": "gpt2-small-res-jb",
           "hook": "blocks.8.hook_resid_pre", "prompt": " the bridge|\x1b[31m",
           "tokens": ["<|endoftext|>", " the", " bridge|", "\x1b[31m"], "token_ids": [50256, 262, 7696, 9],
           "activations": [0.0, 0.0, 12.3456, 0.5], "prompt_start": 1, "act": 12.3456, "xent": 3.21,
           "penalty": 2.0, "saved": datetime(2026, 11, 25, 10, 30, tzinfo=timezone.utc),
           "session": "20261125-103000-abcdef"}
    return {**fav, **changes}


EXPECTED_ENTRY = """\
<!-- epo-tui favorite -->
## Feature 234: Golden Gate Bridge &lt;b&gt;

- model `gpt2` · SAE `gpt2-small-res-jb` at `blocks.8.hook_resid_pre`
- act 12.346 · xent 3.210 · λ 2.00
- saved 2026-11-25 10:30:00 UTC from session `20261125-103000-abcdef`
- after the prefix `<|endoftext|>`

~~~text
 the bridge|\\x1b[31m
~~~

 the<b> bridge\\|</b><sup>12.35</sup><b>\\\\x1b\\[31m</b><sup>0.50</sup>

| pos | token | id | act |
|---:|---|---:|---:|
| 1 | ␣the | 262 | 0.000 |
| 2 | ␣bridge\\| | 7696 | 12.346 |
| 3 | \\\\x1b\\[31m | 9 | 0.500 |
"""


def test_an_entry_is_exactly_this():
    assert render_entry(_fav()) == EXPECTED_ENTRY


def test_an_entry_says_how_far_past_the_dataset_maximum_it_got():
    lines = render_entry(_fav(dataset_ratio=1.2345)).splitlines()
    assert lines[4] == "- act 12.346 (1.23× the dataset maximum) · xent 3.210 · λ 2.00"


def test_entry_variants_several_features_no_label_no_ids_iso_time():
    entry = render_entry(_fav(features=[3, 9], label=None, token_ids=None, prompt_start=0,
                              saved="2026-11-25T11:30:00+01:00", session=None))
    lines = entry.splitlines()
    assert lines[1] == "## Features 3, 9"
    assert "- saved 2026-11-25 10:30:00 UTC" in lines
    assert not any(line.startswith("- after the prefix") for line in lines)
    assert "| pos | token | act |" in lines and "| 0 | &lt;\\|endoftext\\|&gt; | 0.000 |" in lines
    with pytest.raises(ValueError, match="missing act"):
        render_entry({k: v for k, v in _fav().items() if k != "act"})


def test_new_file_gets_a_heading_and_entries_read_back(tmp_path):
    path = tmp_path / "deep" / "er" / "favorites.md"
    assert read_favorites(path) == []
    assert append_favorite(path, _fav()) == path
    append_favorite(path, _fav(features=[7]))
    text = path.read_text()
    assert text == "# epo-tui favorites\n\n" + EXPECTED_ENTRY + "\n" + render_entry(_fav(features=[7]))
    assert read_favorites(path) == [EXPECTED_ENTRY, render_entry(_fav(features=[7]))]


HOSTILE = ["``` ~~~~~ ``", "~~~", "\x1b[31mred\x1b[0m", "a\rb\nc", MARKER, "\n" + MARKER + "\n", "</details>",
           "-->", "<!--", "\u2028" + MARKER, "<script>alert(1)</script>"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_token_text_cannot_escape_its_fence_or_forge_an_entry(tmp_path, hostile):
    fav = _fav(prompt=hostile + hostile, tokens=["<|endoftext|>", hostile, hostile], token_ids=[0, 1, 2],
               activations=[0.0, 1.0, -1.0], label=hostile)
    path = tmp_path / "favorites.md"
    append_favorite(path, fav)
    append_favorite(path, _fav())
    text = path.read_text()
    assert "\x1b" not in text and "\r" not in text and "\u2028" not in text
    entries = read_favorites(path)
    assert len(entries) == 2 and entries[1] == EXPECTED_ENTRY
    lines = entries[0].splitlines()
    opening = next(i for i, line in enumerate(lines) if line.startswith("~~~"))
    fence = lines[opening].removesuffix("text")
    assert set(fence) == {"~"} and lines[opening + 1] == inert(hostile + hostile)
    assert lines[opening + 2] == fence  # the prompt is one line and the next line closes the fence
    outside = lines[:opening] + lines[opening + 3:]
    assert outside[0] == MARKER
    for line in outside[1:]:  # outside the fence, token text can add no HTML (incl. comments)
        assert not any(tag in line for tag in ("<!--", "-->", "</details>", "<script>")), line


def test_two_processes_appending_at_once_leave_every_entry_whole(tmp_path):
    path = tmp_path / "favorites.md"
    code = ("import sys\nfrom pathlib import Path\nfrom epo_tui.favorites import append_favorite\n"
            "sys.path.insert(0, {tests!r})\nfrom test_favorites import _fav\n"
            "for i in range(100):\n"
            "    fav = _fav(features=[int(sys.argv[1]) * 1000 + i], prompt=f'p{{i}} ~~~ \\x1b')\n"
            "    append_favorite(Path({path!r}), fav)\n")
    code = code.format(tests=str(Path(__file__).parent), path=str(path))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(n)], stderr=subprocess.PIPE, text=True)
             for n in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    entries = read_favorites(path)
    assert len(entries) == 200
    features = sorted(int(entry.splitlines()[1].split()[2].rstrip(":")) for entry in entries)
    assert features == sorted([1000 + i for i in range(100)] + [2000 + i for i in range(100)])
    for entry in entries:
        feature = int(entry.splitlines()[1].split()[2].rstrip(":"))
        assert entry == render_entry(_fav(features=[feature], prompt=f"p{feature % 1000} ~~~ \x1b"))


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_keeps_the_earlier_favorites(tmp_path, monkeypatch):
    path = tmp_path / "favorites.md"
    append_favorite(path, _fav())
    before = path.read_bytes()
    monkeypatch.setattr(atomic, "write_bytes_atomic", _disk_full)
    with pytest.raises(UserError) as err:
        append_favorite(path, _fav(features=[5]))
    assert str(err.value) == f"could not save the favorite to {path}: No space left on device"
    monkeypatch.undo()

    monkeypatch.setattr(os, "replace", _disk_full)  # the real writer, failing at the rename
    with pytest.raises(UserError, match="No space left on device"):
        append_favorite(path, _fav(features=[5]))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["favorites.md", "favorites.md.lock"]  # no temp file


def test_a_held_lock_times_out_as_a_user_error(tmp_path, monkeypatch):
    path = tmp_path / "favorites.md"
    monkeypatch.setattr(favorites, "LOCK_TIMEOUT_S", 0.2)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import filelock, sys, time\nwith filelock.FileLock({str(path) + '.lock'!r}):\n"
                               "    print('held', flush=True)\n    time.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=r"favorites\.md\.lock is still locked by another process"):
            append_favorite(path, _fav())
    finally:
        holder.kill()
        holder.wait()
    assert not path.exists()


def test_symlinked_file_is_written_through_and_keeps_its_permissions(tmp_path):
    target = tmp_path / "notes" / "mine.md"
    target.parent.mkdir()
    target.write_bytes(b"my own notes \xff (not UTF-8)")  # kept byte for byte
    target.chmod(0o644)
    link = tmp_path / "favorites.md"
    link.symlink_to(target)
    assert append_favorite(link, _fav()) == target
    assert link.is_symlink()
    assert target.read_bytes() == b"my own notes \xff (not UTF-8)\n\n" + EXPECTED_ENTRY.encode()
    assert target.stat().st_mode & 0o777 == 0o644
    assert read_favorites(link) == [EXPECTED_ENTRY]


def test_default_path_is_in_the_data_folder_unless_configured(tmp_path):
    default = favorites_path(Config())
    assert default == paths.data_dir() / "favorites.md"
    assert str(default).startswith(os.environ["XDG_DATA_HOME"])
    configured = parse_config('[favorites]\npath = "keep/fav.md"\n', base_dir=tmp_path)
    assert favorites_path(configured) == tmp_path / "keep" / "fav.md"


def test_a_favorite_from_a_sessions_elites(tmp_path):
    meta = {"config": {}, "model": "gpt2", "sae": {"name": "gpt2-small-res-jb", "hook": "blocks.8.hook_resid_pre"},
            "feature": {"indices": [234]}, "lambdas": [2.0], "iterations_total": 10, "label": "Golden Gate Bridge <b>"}
    session = create_session(meta, tmp_path / "sessions")
    elite = {k: _fav()[k] for k in ("tokens", "token_ids", "activations", "prompt_start", "act", "xent", "penalty")}
    session.write_checkpoint({}, 3, [{**elite, "text": _fav()["prompt"], "objective": 1.0}])
    fav = favorite_from_elite(session.read_meta(), session.read_elites()[0], saved=_fav()["saved"])
    assert render_entry(fav) == EXPECTED_ENTRY.replace("20261125-103000-abcdef", session.id)
    assert json.dumps(favorite_from_elite(session.read_meta(), session.read_elites()[0], saved="x"))

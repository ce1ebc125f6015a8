"""Atomic writes (epo_tui/atomic.py): whole content or the old one, and a new file's usual permissions."""

from __future__ import annotations

import os
import stat

from epo_tui.atomic import write_json_atomic, write_text_atomic


def test_written_files_follow_the_umask_like_any_new_file(tmp_path):
    """Results are read by collaborators: 0644 under umask 022 (tempfile.mkstemp gave 0600), 0600 under 077."""
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "result.json", {"act": 1.5})
        os.umask(0o077)
        write_text_atomic(tmp_path / "report.md", "# EPO\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o600
    assert (tmp_path / "result.json").read_text() == '{\n "act": 1.5\n}\n'
    write_text_atomic(tmp_path / "report.md", "# EPO, again\n")  # replaced whole, no temp file left behind
    assert (tmp_path / "report.md").read_text() == "# EPO, again\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "result.json"]

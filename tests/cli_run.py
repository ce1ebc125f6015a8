"""Running `epo-tui` in-process for tests: main(argv) with its output captured."""

from __future__ import annotations

import contextlib
import io

from epo_tui.cli import main


def run_cli(*argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of main(argv); argparse's exits become exit codes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()

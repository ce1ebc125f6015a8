"""DESIGN.md §2: the UI side never imports the engine's heavy libraries; the engine never imports the UI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "epo_tui"
HEAVY = ("jax", "jaxlib", "torch", "transformers", "sae_lens", "transformer_lens")
# Modules the UI and the CLI's front door use; each must start without any heavy library.
PLAIN_MODULES = ["epo_tui.config", "epo_tui.paths", "epo_tui.features", "epo_tui.themes", "epo_tui.text",
                 "epo_tui.atomic", "epo_tui.errors", "epo_tui.terminal", "epo_tui.progress", "epo_tui.results",
                 "epo_tui.cli", "epo_tui.labels", "epo_tui.tui.app", "epo_tui.sessions", "epo_tui.favorites",
                 "epo_tui.client", "epo_tui.stars", "epo_tui.tui.screens.sessions", "epo_tui.tui.screens.settings",
                 "epo_tui.session_catalog", "epo_tui.pareto", "epo_tui.bus", "epo_tui.feature_search",
                 "epo_tui.bench", "epo_tui.bench.report", "epo_tui.bench.ui_latency", "epo_tui.session_report"]


@pytest.mark.parametrize("module", PLAIN_MODULES)
def test_plain_module_imports_no_heavy_library(module):
    code = (f"import sys, json, {module}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == []


def test_cli_help_and_config_errors_load_no_heavy_library(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[search]\nelites = 0\n")
    code = ("import sys, json\nfrom epo_tui.cli import main\n"
            f"main(['score', '--config', {str(bad)!r}, 'x'])\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout) == []


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["run", "--help"], ["batch", "--help"]])
def test_help_loads_neither_a_heavy_library_nor_the_ui_stack(argv):
    """`epo-tui --help` answers at once: no JAX, torch, Textual, or pyte (which only `bench --ui` reads with)."""
    avoided = (*HEAVY, "textual", "pyte")
    code = ("import sys, json\nfrom epo_tui.cli import main\ntry:\n"
            f"    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {avoided!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_only_the_engine_imports_heavy_libraries_at_module_level():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        # demo/: the pack's builder trains in JAX; bench/: the benchmarks that measure the engine load it (the
        # package itself, its report scaffold and the UI's benchmark are plain: PLAIN_MODULES)
        if path.relative_to(PACKAGE).parts[0] in ("engine", "demo", "bench"):
            continue
        for name in _imports(path, top_level_only=True):
            if name.split(".")[0] in HEAVY or name.startswith("epo_tui.engine"):
                offenders.append(f"{path.relative_to(PACKAGE)}: {name}")
    assert offenders == []


def test_the_ui_never_imports_the_engine_even_lazily():
    tui = PACKAGE / "tui"
    offenders = [f"{p.relative_to(PACKAGE)}: {name}" for p in tui.rglob("*.py")
                 for name in _imports(p, top_level_only=False)
                 if name.split(".")[0] in HEAVY or name.startswith("epo_tui.engine")] if tui.is_dir() else []
    assert offenders == []


def test_the_engine_never_imports_the_ui():
    offenders = [f"{p.relative_to(PACKAGE)}: {name}" for p in (PACKAGE / "engine").rglob("*.py")
                 for name in _imports(p, top_level_only=False)
                 if name.startswith(("epo_tui.tui", "textual"))]
    assert offenders == []


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_help_loads_neither_jax_nor_the_terminal_libraries(argv):
    """`epo-tui --help` builds the whole parser, the benchmarks' options included: it must stay instant."""
    code = ("import sys, json, contextlib, io\nfrom epo_tui.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main({argv!r})\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'jax', 'jaxlib', 'pyte', 'textual', 'torch', 'transformers', 'sae_lens'})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == []

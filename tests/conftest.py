"""Test isolation: every test session gets its own config/cache/data folders and no hub access; the fixtures
shared across test folders (the tiny model, a worker subprocess)."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

import pytest

# the helpers shared by the test folders (fake_worker, tui_pilot, worker_process, ...) import by name
sys.path.insert(0, str(Path(__file__).resolve().parent))
_HOME = Path(tempfile.mkdtemp(prefix="epo-tui-tests-"))
# Set before anything imports platformdirs users or huggingface_hub (they read these at import).
os.environ.update({
    "XDG_CONFIG_HOME": str(_HOME / "config"),
    "XDG_CACHE_HOME": str(_HOME / "cache"),
    "XDG_DATA_HOME": str(_HOME / "data"),
    "HF_HOME": str(_HOME / "hf"),
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "JAX_PLATFORMS": "cpu",
})


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_executables():
    """Drops every compiled executable after each test module. Each one keeps its machine code mapped
    (a few memory maps apiece), and the whole suite compiles thousands: kept to the end, one process
    passes Linux's 65,530 maps per process and XLA's next compile crashes (segfault or abort)."""
    yield
    if "jax" in sys.modules:
        import jax

        from epo_tui.engine import evaluation

        evaluation.full_evaluator.cache_clear()
        evaluation.suffix_evaluator.cache_clear()
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 + standard SAE + config.toml, written once per test session by the documented helper."""
    from epo_tui.engine.tiny import main as write_tiny

    folder = tmp_path_factory.mktemp("tiny")
    assert write_tiny([str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def tiny_config(tiny_dir):
    from epo_tui.config import load_config

    return load_config(str(tiny_dir / "config.toml"))


@pytest.fixture(scope="session")
def tiny_pair(tiny_config):
    """The tiny model and SAE, loaded once per session (read-only in every test)."""
    from epo_tui.engine.pairing import load_model_with_sae

    return load_model_with_sae(tiny_config)


@pytest.fixture
def worker_factory(tmp_path):
    """make() starts an `epo-tui worker` subprocess in tmp_path and waits for its hello; all are killed after."""
    from worker_process import WorkerProcess

    started = []

    def make() -> WorkerProcess:
        w = WorkerProcess(tmp_path)
        w.expect("hello")
        started.append(w)
        return w

    yield make
    for w in started:
        w.close()


@pytest.fixture
def hub_host_unresolvable(monkeypatch):
    """No HF_HUB_OFFLINE, and the hub's host does not resolve (a machine without a network)."""
    import socket

    from huggingface_hub import constants

    from epo_tui.engine import hub_access

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_access, "_unreachable", [])
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    return constants

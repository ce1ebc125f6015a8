"""The UI on a worker at the far end of a real SSH link (`--worker "ssh -p PORT 127.0.0.1 epo-tui worker"`):
Debian's sshd on 127.0.0.1 with a key made for the test. A search runs, the ssh client is killed (a dropped
link), `R` brings the worker back and resumes the search from its checkpoint, and `o` lists the sessions of
the worker's side, not the UI's.

The worker's side keeps its sessions in a cache folder of its own (passed in the remote command, since
ssh does not carry the environment), so "the remote session" is one the UI's own cache does not hold.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epo_tui import sessions
from epo_tui.client import worker_command
from epo_tui.tui.screens.sessions import SessionsScreen
from tui_pilot import iteration_shown, search_until, tiny_app, until

SSHD = Path("/usr/sbin/sshd")
# loading and compiling the tiny model twice over the link, on 2 shared cores: generous, and only a bound
TIMEOUT = 300.0

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    """(port, client key): sshd on 127.0.0.1 accepting one key, for the user running the tests."""
    if not SSHD.exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs openssh-server for this test (.ci/run); sshd or ssh is missing")
        pytest.skip("needs openssh-server and openssh-client (apt-get install openssh-server)")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_bytes((keys / "client_key.pub").read_bytes())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    port = _free_port()
    (keys / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host_key'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {keys / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel ERROR\n")
    daemon = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(keys / "sshd_config")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            pytest.fail(f"sshd did not start: {daemon.stderr.read().decode(errors='replace')[-2000:]}")
        time.sleep(0.1)
    yield port, keys / "client_key"
    daemon.terminate()
    daemon.wait(timeout=30)


def _remote_worker(port: int, key: Path, remote_home: Path) -> str:
    """The --worker text a user would type, with the worker's own folders set in the remote command."""
    env = {"XDG_CACHE_HOME": remote_home / "cache", "XDG_CONFIG_HOME": remote_home / "config",
           "XDG_DATA_HOME": remote_home / "data", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    remote = " ".join(["env", *(f"{k}={shlex.quote(str(v))}" for k, v in env.items()),
                       shlex.quote(sys.executable), "-m", "epo_tui", "worker"])
    return (f"ssh -p {port} -i {shlex.quote(str(key))} -o BatchMode=yes -o StrictHostKeyChecking=no "
            f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR 127.0.0.1 {shlex.quote(remote)}")


def _remote_stopped(root: Path, session_id: str) -> bool:
    """The remote worker has checkpointed the session and let it go (it may be resumed)."""
    try:
        session = sessions.find_session(session_id, root)
        return session.read_meta()["status"] == "stopped" and not session.is_running_elsewhere()
    except sessions.SessionError:
        return False


def test_a_dropped_link_resumes_with_R_and_o_lists_the_remote_sessions(sshd, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "local-cache"))  # the UI's own sessions folder
    port, key = sshd
    remote_home = tmp_path / "remote"
    remote_sessions = remote_home / "cache" / "epo-tui" / "sessions"
    app = tiny_app(tiny_dir, worker_command(_remote_worker(port, key, remote_home)))

    async def scenario():
        async with app.run_test(size=(120, 40)) as pilot:
            session_id = await search_until(pilot, 3, TIMEOUT)
            os.kill(app.client.pid, signal.SIGKILL)  # the ssh client dies: the link dropped
            await until(pilot, lambda: app.worker_dead, "the UI to see the worker gone", TIMEOUT)
            # the far end saw its input close: it checkpoints the search as stopped and exits
            await until(pilot, lambda: _remote_stopped(remote_sessions, session_id), "the remote checkpoint",
                        TIMEOUT)
            checkpoint = sessions.find_session(session_id, remote_sessions).read_meta()["checkpoint_iteration"]
            await pilot.press("R")
            await until(pilot, lambda: not app.worker_dead and app.session is not None
                        and app.session.session == session_id and app.session.iteration > 0, "the resume", TIMEOUT)
            resumed_at = app.session.iteration
            await until(pilot, lambda: iteration_shown(app) > resumed_at, "progress again", TIMEOUT)
            await pilot.press("o")
            await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, "the list",
                        TIMEOUT)
            listed, title = list(app.screen.rows), app.screen.host
            await pilot.press("escape")
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, "the app to exit", TIMEOUT)
        return session_id, checkpoint, resumed_at, listed, title

    session_id, checkpoint, resumed_at, listed, host = asyncio.run(scenario())
    assert checkpoint >= 3 and resumed_at == checkpoint  # resumed exactly where the checkpoint left it
    assert listed == [session_id] and host == socket.gethostname()
    assert sessions.list_sessions() == ([], [])  # the UI's own cache holds none: the list was the remote's
    assert _remote_stopped(remote_sessions, session_id)  # `q` stopped the resumed search cleanly

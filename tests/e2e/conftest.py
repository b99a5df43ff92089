"""A real Ray head started with `ray start` for the job-submission tests.

Started with token auth (a fresh token in a temporary file named by ``RAY_AUTH_TOKEN_PATH``, so
the tests neither need nor touch ``~/.ray/auth_token``, which a new machine does not have) and
the dashboard on 127.0.0.1, in its own process (``--block``), and
stopped with SIGTERM to that process only: never ``ray stop``, which would stop every Ray on the
machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class RayHead:
    dashboard_url: str
    env: dict[str, str]  # environment for a client of this head (address + token auth)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_cli() -> str:
    ray = Path(sys.executable).with_name("ray")
    return str(ray) if ray.exists() else shutil.which("ray")


def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dashboard at {url} did not come up in {timeout}s")


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    dashboard_port = _free_port()
    directory = tmp_path_factory.mktemp("ray_head")
    token = directory / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # Job drivers run `python` from PATH: make it this environment's interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "PATH": path}
    for inherited in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(inherited, None)
    log = open(directory / "head.log", "w")
    # Its own temp dir (short: Ray's socket paths are length-limited) keeps this head's sessions,
    # and the address `ray start` records for later `ray` commands, out of the machine's /tmp/ray.
    temp_dir = tempfile.mkdtemp(prefix="llmray-e2e-", dir="/tmp")
    proc = subprocess.Popen(
        [_ray_cli(), "start", "--head", f"--port={_free_port()}", "--num-cpus=1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         # the agent's default port (52365) is taken by any other Ray on this machine, and an agent
         # that cannot bind leaves the head without a job agent ("No available agent to submit job")
         f"--dashboard-agent-listen-port={_free_port()}",
         "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(url, proc)
        yield RayHead(url, {**env, "RAY_ADDRESS": url})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)  # workers that left the group
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)

"""A multi-node Ray cluster on one machine: a head and worker nodes, each a ``ray start --block``
process with its own ``--temp-dir``, its own CPUs and a custom resource naming it (so placement can
be forced), token auth on with a fresh token. Only the processes started here are stopped: each
node's process group, then anything still running under its temp dir (never ``ray stop``)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))

WAIT_FOR_NODES = textwrap.dedent("""
    import sys, time, ray
    ray.init(address=sys.argv[1], logging_level="ERROR")
    deadline = time.monotonic() + float(sys.argv[3])
    while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
        if time.monotonic() > deadline:
            sys.exit(f"only {sum(n['Alive'] for n in ray.nodes())} of {sys.argv[2]} nodes came up")
        time.sleep(0.5)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """``LocalCluster(tmp, {"node_b": {"PYTHONPATH": ...}})``: head (resource ``head``) plus one
    worker node per entry (resource named like it, extra environment from its value)."""

    def __init__(self, root: Path, workers: dict[str, dict[str, str]], cpus_per_node: int = 1,
                 timeout: float = 120, head_cpus: int | None = None) -> None:
        self.root = Path(root)
        # Ray's socket paths live under each temp dir and may not exceed 107 bytes: keep it short.
        self.ray_root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.address = f"127.0.0.1:{_free_port()}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.temp_dirs: dict[str, Path] = {}
        self.workers, self.cpus_per_node = workers, cpus_per_node
        try:
            self._start("head", ["--head", "--port", self.address.rsplit(":", 1)[1], "--include-dashboard=false"],
                        cpus_per_node if head_cpus is None else head_cpus, {})
            self._wait_for_port(timeout)
            for name, env in workers.items():
                self._start(name, ["--address", self.address], cpus_per_node, env)
            self._wait_for_nodes(1 + len(workers), timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str], cpus: int, env: dict[str, str]) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.temp_dirs[name] = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.ray_root))
        self.nodes[name] = subprocess.Popen(
            [RAY, "start", "--block", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
             "--resources", json.dumps({name: 1}), "--disable-usage-stats", "--temp-dir", str(self.temp_dirs[name])],
            env={**self.env, **env}, stdout=log, stderr=log, start_new_session=True)

    def kill(self, name: str) -> None:
        """SIGKILL every Ray process of worker node ``name`` (a node lost), without waiting for Ray to notice."""
        process = self.nodes[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        subprocess.run(["pkill", "-9", "-f", str(self.temp_dirs[name])], check=False)

    def replace(self, name: str) -> None:
        """Start a fresh node with ``name``'s resources and environment (an autoscaler's replacement)."""
        self._start(name, ["--address", self.address], self.cpus_per_node, self.workers[name])

    def _wait_for_port(self, timeout: float) -> None:
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                if self.nodes["head"].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the head node did not start: {self.log('head')}")
                time.sleep(0.3)

    def _wait_for_nodes(self, count: int, timeout: float) -> None:
        proc = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, self.address, str(count), str(timeout)],
                              env=self.env, capture_output=True, text=True, timeout=timeout + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"cluster not ready: {proc.stderr[-2000:]}\n"
                               + "\n".join(f"{n}: {self.log(n)}" for n in self.nodes))

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def client_env(self) -> dict[str, str]:
        """Environment for a driver process of this cluster (address and token)."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def stop(self) -> None:
        for name, process in reversed(list(self.nodes.items())):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.nodes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for temp_dir in self.temp_dirs.values():  # workers and agents that left the process group
            subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)
        shutil.rmtree(self.ray_root, ignore_errors=True)

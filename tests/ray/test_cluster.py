"""Ray connection: the embedded cluster, joining it by address, and refusing unauthenticated clients."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ray

CLIENT = textwrap.dedent("""
    import ray
    from llmray import cluster
    connection = cluster.connect()
    print("EMBEDDED", connection.embedded)
    print("CPUS", int(ray.cluster_resources()["CPU"]))
    print("TASK", ray.get(ray.remote(lambda: 41 + 1).remote()))
""")


def _client(env_updates: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_updates}
    return subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_embedded_cluster_is_local_and_sized(ray_session):
    import ray

    assert ray_session.embedded
    assert ray.cluster_resources()["CPU"] == 2
    assert ray.get(ray.remote(lambda x: x * 2).remote(21)) == 42


def test_connect_reuses_initialised_ray(ray_session):
    from llmray import cluster

    assert cluster.connect() is ray_session or cluster.connect().address == ray_session.address


def test_second_process_joins_by_address(ray_session):
    proc = _client({"RAY_ADDRESS": ray_session.address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EMBEDDED False" in proc.stdout and "CPUS 2" in proc.stdout and "TASK 42" in proc.stdout


def test_client_with_wrong_token_is_refused(ray_session):
    proc = _client({"RAY_ADDRESS": ray_session.address, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": "0" * 64,
                    "RAY_gcs_server_port_wait_time_s": "3"}, timeout=180)  # fail after 3 retries
    assert proc.returncode != 0
    assert "TASK 42" not in proc.stdout
    assert "Authentication" in proc.stderr or "InvalidAuthToken" in proc.stderr

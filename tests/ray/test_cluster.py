"""Ray connection: the embedded cluster, joining it by address, and refusing unauthenticated clients."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

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


STALE_RAY_START = textwrap.dedent("""
    import sys
    import time

    from llmray import cluster
    from llmray.train import ray_train
    from llmray.train.launch import ExecutionConfig

    dashboard = sys.argv[1] == "dashboard"
    cluster.connect(cluster.RayConfig(num_cpus=2, dashboard=dashboard, object_store_memory_mb=128))
    if dashboard:
        from ray.util.state import list_actors
        print("STATE_API_ACTORS", len(list_actors(timeout=10)))
    value = ray_train.fit(lambda config: config["answer"], {"answer": 7},
                          ExecutionConfig(launcher="ray_train", workers=1, cpus_per_worker=1),
                          name="stale", storage_path=sys.argv[2])
    print("RETURNED", value)
    time.sleep(2)  # let Ray forward the run's last actor logs before this driver exits
""")


@pytest.mark.parametrize("dashboard", ["dashboard", "no-dashboard"])
def test_a_stale_ray_start_address_neither_stalls_the_state_api_nor_the_end_of_a_training_run(
        ray_session, tmp_path, dashboard):
    """A `ray start` head that has gone leaves its address in <temp>/ray/ray_current_cluster, where
    Ray's State API looked for its server: every query then waited 40 s for a dead GCS, and Ray
    Train's placement-group cleaner made each run end with a 12 s wait and a traceback."""
    short_temp = tempfile.mkdtemp(prefix="llmray-stale-", dir="/tmp")  # Ray's socket paths are length-limited
    try:
        (Path(short_temp) / "ray").mkdir()
        (Path(short_temp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
        env = {**os.environ, "RAY_TMPDIR": short_temp}
        for inherited in ("RAY_ADDRESS", "LLMRAY_RAY_WITHOUT_STATE_API"):
            env.pop(inherited, None)
        proc = subprocess.run([sys.executable, "-c", STALE_RAY_START, dashboard, str(tmp_path / "runs")],
                              env=env, capture_output=True, text=True, timeout=240)
    finally:
        subprocess.run(["pkill", "-9", "-f", short_temp], check=False)
        shutil.rmtree(short_temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RETURNED 7" in proc.stdout
    if dashboard == "dashboard":
        assert "STATE_API_ACTORS" in proc.stdout
    assert "PlacementGroupCleaner" not in proc.stderr, proc.stderr[-3000:]

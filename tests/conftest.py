"""Shared test fixtures.

One local Ray per test session (``ray_session``): starting Ray costs ~10 s on 2 cores, so every
test under tests/ray and tests/e2e shares it. It is small (2 CPUs, capped object store) and is
shut down with ``ray.shutdown()`` only: never ``ray stop``, which would kill every Ray on the
machine.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests import s3_support

s3_support.configure_environment()  # before any Ray starts: its workers inherit the S3 endpoint
# This session's node-local cache of remote files (llmray.storage.local_copy), for the tests and
# the Ray workers they start, instead of the developer's ~/.cache/llmray.
os.environ["LLMRAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmray-test-cache-")
atexit.register(shutil.rmtree, os.environ["LLMRAY_CACHE_DIR"], ignore_errors=True)
# Tests report every few milliseconds and start ~100 Ray Train runs: a 0.1 s controller poll (the
# embedded default is 0.5 s, llmray.cluster) keeps report() and the end of each run from waiting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLMRAY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public datasets beside the checkout. Outside CI the tests that need them skip,
    saying where they looked; in CI (``CI`` set, where shared/ lies beside the clone) their absence
    fails those tests instead of skipping them silently."""
    if not SHARED_DATA.is_dir():
        message = f"shared datasets not found at {SHARED_DATA} (set LLMRAY_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """The session's embedded local Ray (2 CPUs, 512 MiB object store, no dashboard)."""
    import ray

    from llmray import cluster

    connection = cluster.connect(cluster.RayConfig(num_cpus=2, object_store_memory_mb=512,
                                                   dashboard=False))
    yield connection
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 API (moto server) for the session; see :mod:`tests.s3_support`."""
    server = s3_support.MotoServer(os.environ[s3_support.ENDPOINT_VARIABLE])
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """``s3://<a fresh bucket>`` on the local S3 server."""
    return f"s3://{s3_server.bucket()}"


def pytest_collection_modifyitems(config, items):
    import importlib.util

    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)"))


@pytest.fixture
def one_thread():
    """One torch thread for tiny models: on a shared 2-core machine two threads were ~5x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

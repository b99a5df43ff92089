"""Connect to Ray: an existing cluster when an address is given, otherwise an embedded local one.

Security: Ray's dashboard and jobs API run arbitrary code for whoever can reach them, so the
embedded cluster binds its dashboard to 127.0.0.1 and runs with token authentication. Ray 2.60
turns token auth on by default for local clusters (the token goes to ``~/.ray/auth_token``,
which we make owner-only); ``RAY_AUTH_MODE`` is read when ``ray`` is imported, so it cannot be
switched on here after the fact, and tests assert that the embedded cluster refuses
unauthenticated calls. GCS and raylet still listen on all interfaces (Ray rewrites a loopback
node address), which is why the token matters. Remote clusters get ``RAY_AUTH_MODE=token`` from
the YAMLs in ``cluster/``.

Ray is imported inside the functions: the rest of the library must import without it.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from llmray.config import param

LOCALHOST = "127.0.0.1"
_WITHOUT_STATE_API = "LLMRAY_RAY_WITHOUT_STATE_API"


@dataclass
class RayConfig:
    """How a stage reaches Ray."""

    address: str | None = param(None, doc="Ray address (e.g. 'auto' or 'ray://host:10001'); "
                                          "empty means RAY_ADDRESS or an embedded local Ray")
    num_cpus: int | None = param(None, doc="CPUs of an embedded local Ray (default: all cores)", min=1)
    object_store_memory_mb: int | None = param(None, doc="object store cap of an embedded Ray, MiB",
                                               min=64)
    dashboard: bool = param(True, doc="start the dashboard (on 127.0.0.1) with an embedded Ray")
    dashboard_port: int = param(8265, doc="dashboard port of an embedded Ray", min=1, max=65535)


@dataclass
class Connection:
    """What :func:`connect` did, so callers can report it."""

    address: str
    embedded: bool
    dashboard_url: str | None


_current: Connection | None = None


def current_connection() -> Connection | None:
    """The connection this process made through :func:`connect`, if any (for end-of-run reports)."""
    return _current


def _resolve_address(cfg: RayConfig) -> str | None:
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def _set_embedded_environment(dashboard_url: str | None) -> None:
    # Inherited by the local Ray processes, so it must be set before they start. Ray Train's
    # controller polls every worker every 2 s by default, and a report() made before the previous
    # one was polled blocks until it is: 0.5 s keeps that wait short at llmray's log intervals.
    # Shorter is not free: at 0.1 s the polls took ~0.02 cores (controller + the worker's main
    # thread): its training loop got 1.894 cores of 2 instead of 1.915 at 1 s (bench/RESULTS.md).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not dashboard_url:
        os.environ[_WITHOUT_STATE_API] = "1"
        return
    os.environ.pop(_WITHOUT_STATE_API, None)
    # Ray's State API (which Ray Train's placement-group cleaner asks every second whether its
    # controller lives) otherwise finds its server through /tmp/ray/ray_current_cluster, the last
    # `ray start` head: once that head is gone every query waits 40 s for a dead GCS, and every
    # Ray Train run ended with a 12 s wait and a GetTimeoutError traceback.
    os.environ["RAY_API_SERVER_ADDRESS"] = dashboard_url


def connect(cfg: RayConfig | None = None) -> Connection:
    """Initialise Ray once per process and say where it is.

    Reuses an already initialised Ray (tests, Ray jobs and Tune trials), joins the cluster at
    ``cfg.address`` or ``RAY_ADDRESS`` when given, and otherwise starts a local cluster on
    127.0.0.1 with token auth.
    """
    global _current
    _current = _connect(cfg or RayConfig())
    return _current


def _connect(cfg: RayConfig) -> Connection:
    import ray

    if ray.is_initialized():
        if _current is not None:
            return _current
        return Connection(address=ray.get_runtime_context().gcs_address, embedded=False,
                          dashboard_url=_dashboard_url_of_running())
    address = _resolve_address(cfg)
    if address:
        os.environ.pop(_WITHOUT_STATE_API, None)
        info = ray.init(address=address)
        return Connection(address=address, embedded=False, dashboard_url=_url(info.dashboard_url))
    dashboard_port = _free_port_from(cfg.dashboard_port)
    _set_embedded_environment(f"http://{LOCALHOST}:{dashboard_port}" if cfg.dashboard else None)
    kwargs = {}
    if cfg.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
    info = ray.init(
        # "local" forces a new cluster: with no address Ray would join whatever `ray start` head
        # it finds recorded in /tmp/ray, which is not what an embedded run asked for.
        address="local",
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.dashboard,
        dashboard_host=LOCALHOST,
        dashboard_port=dashboard_port,
        **kwargs,
    )
    _restrict_token_file()
    return Connection(address=info.address_info["gcs_address"], embedded=True,
                      dashboard_url=_url(info.dashboard_url) if cfg.dashboard else None)


def _free_port_from(port: int) -> int:
    """``port`` if nothing listens on it, else a free port (another Ray may hold 8265)."""
    with socket.socket() as probe:
        try:
            probe.bind((LOCALHOST, port))
            return port
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def resources_in_use() -> dict[str, float]:
    """CPUs and GPUs of the Ray cluster this process is connected to, else of this machine.

    Recorded in each stage's manifest for the run report's cost accounting.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        total = ray.cluster_resources()
        return {"cpus": float(total.get("CPU", 0)), "gpus": float(total.get("GPU", 0))}
    return {"cpus": float(os.cpu_count() or 1), "gpus": 0.0}


def _restrict_token_file() -> None:
    """Ray writes the generated token world-readable; only its owner should be able to read it."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)


def _url(dashboard_url: str | None) -> str | None:
    if not dashboard_url:
        return None
    return dashboard_url if dashboard_url.startswith("http") else f"http://{dashboard_url}"


def serves_state_api() -> bool:
    """Whether the Ray this process runs in serves Ray's State API (the dashboard does). False only
    in an embedded Ray started without a dashboard: it has none, though it records a dashboard
    address in the GCS, so :func:`connect` says so in the environment its processes inherit."""
    return os.environ.get(_WITHOUT_STATE_API) != "1"


def _dashboard_url_of_running() -> str | None:
    try:
        from ray._private.worker import get_dashboard_url

        return _url(get_dashboard_url())
    except Exception:  # noqa: BLE001 - the dashboard is optional; its absence is not an error
        return None


def describe(conn: Connection) -> str:
    where = "embedded local Ray" if conn.embedded else "Ray cluster"
    dash = f"; dashboard at {conn.dashboard_url}" if conn.dashboard_url else "; no dashboard"
    return f"connected to {where} at {conn.address}{dash}"

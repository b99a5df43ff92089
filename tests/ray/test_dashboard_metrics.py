"""Stage metrics reach Ray's Prometheus endpoint (what the dashboard's metrics view reads)."""

from __future__ import annotations

import time
import urllib.request

import pytest

from llmray import dashboard_metrics

pytestmark = pytest.mark.ray


def _scrape() -> str:
    import ray

    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_logged_metrics_and_drop_counts_are_exported(ray_session):
    dashboard_metrics.publish("metrics-test", "pretrain", {"loss": 2.75, "tokens_per_s": 4321.0, "tag": "x"})
    dashboard_metrics.count_dropped("metrics-test", "curate", "too_short", 7)
    wanted = ['ray_llmray_loss{', 'ray_llmray_tokens_per_s{', 'ray_llmray_docs_dropped_total{']
    deadline = time.time() + 60
    while time.time() < deadline:
        lines = [line for line in _scrape().splitlines() if 'run="metrics-test"' in line]
        if all(any(line.startswith(w) for line in lines) for w in wanted):
            break
        time.sleep(2)
    loss = next(line for line in lines if line.startswith("ray_llmray_loss{"))
    assert 'stage="pretrain"' in loss and loss.endswith(" 2.75")
    dropped = next(line for line in lines if line.startswith("ray_llmray_docs_dropped_total{"))
    assert 'reason="too_short"' in dropped and dropped.endswith(" 7.0")
    assert not any("llmray_tag" in line for line in lines)

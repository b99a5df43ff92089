"""Stage metrics reach Ray's Prometheus endpoint (what the dashboard's metrics view reads)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter

import pytest

from llmray import dashboard_metrics, stages

pytestmark = pytest.mark.ray


def metrics_url() -> str:
    """This node's Prometheus endpoint (Ray exports every process's metrics through its node agent)."""
    import ray

    node = ray._private.worker.global_worker.node
    return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"


def _scrape() -> str:
    return urllib.request.urlopen(metrics_url(), timeout=10).read().decode()


def dropped_counts(run: str) -> dict[str, float]:
    """``llmray_docs_dropped_total`` of ``run``, per reason."""
    counts = {}
    for line in _scrape().splitlines():
        if line.startswith("ray_llmray_docs_dropped_total{") and f'run="{run}"' in line:
            counts[re.search(r'reason="([^"]*)"', line).group(1)] = float(line.rsplit(" ", 1)[1])
    return counts


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


def test_curation_counts_its_drops_per_reason_as_the_funnel_does(ray_session, shared_data, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(shared_data / "c4_sample" / "c4_demo.jsonl", encoding="utf-8") as handle:
        lines = [next(handle).rstrip("\n") for _ in range(40)]
    lines += [json.dumps({"text": "Too short."})] * 3 + ['{"text": "never closed']  # drops and a quarantine
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n")
    run_root = tmp_path / "curate-drops"
    cfg = stages.build_config(stages.STAGES["curate"], {
        "sources": [{"name": "c4", "kind": "jsonl", "paths": [str(corpus)]}], "execution": {"batch_rows": 16}},
        run_root)
    result = stages.run_stage(stages.STAGES["curate"], cfg, run_root)
    expected = Counter()
    for entry in json.loads((result.output / "funnel.json").read_text())["reasons"]:
        expected[entry["reason"]] += entry["docs"]
    assert len(expected) >= 2 and any(reason.startswith("quarantined:") for reason in expected)
    deadline = time.time() + 60  # Ray's agent exports every ~10 s
    while dropped_counts(run_root.name) != expected and time.time() < deadline:
        time.sleep(2)
    assert dropped_counts(run_root.name) == expected

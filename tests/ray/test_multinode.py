"""A three-node Ray cluster started by the test (head + two worker nodes, token auth): curate's per-node
model check, and pretraining that loses a node."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from llmray import config as config_lib, stages
from tests.multinode_support import LocalCluster

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def test_a_node_without_the_language_id_model_stops_curate_before_anything_is_read(tmp_path, shared_data):
    """node_b's Python finds an llmray without its model file (a broken install there only)."""
    broken = tmp_path / "broken-site" / "llmray"
    shutil.copytree(REPO / "llmray", broken, ignore=shutil.ignore_patterns("resources", "__pycache__"))
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"name": "c4", "kind": "jsonl",
                                                   "paths": [str(shared_data / "c4_sample" / "c4_demo.jsonl")]}]}))
    cluster = LocalCluster(tmp_path, {"node_b": {"PYTHONPATH": str(broken.parent)}, "node_c": {}})
    try:
        proc = subprocess.run([sys.executable, "-m", "llmray.cli", "curate", "--config", str(config),
                               "--runs-dir", str(tmp_path / "runs"), "--run", "demo"],
                              # not from the checkout: Ray puts the driver's directory first on its
                              # workers' sys.path, which would hide node_b's broken llmray
                              cwd=tmp_path, env=cluster.client_env(), capture_output=True, text=True, timeout=300)
    finally:
        cluster.stop()
    assert proc.returncode != 0, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("curate cannot start"):]
    assert "language-ID model lid.176.ftz" in message and "install llmray on every node with pip" in message
    assert message.count(": language-ID model") == 1, message  # only node_b; head and node_c have it
    stage = tmp_path / "runs" / "demo" / "curate"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "lid.176.ftz" in manifest["error"]
    assert not (stage / "output").exists() and "curating" not in (stage / "stage.log").read_text().split(
        "curate cannot start")[0].split("connected to")[-1]


# The cluster's driver: pretraining with a pause after each step, so that the test can lose a node
# mid-run. Prints rank 0's report as JSON.
PRETRAIN_DRIVER = textwrap.dedent("""
    import json, sys, time
    import ray
    from llmray import config as config_lib, stages
    from llmray.train.launch import launch
    from llmray.train.pretrain import pretrain_job

    args = json.loads(sys.argv[1])
    raw = config_lib.apply_overrides(config_lib.read_yaml(args["config"]), args["overrides"])
    cfg = stages.build_config(stages.STAGES["pretrain"], raw, args["root"])

    def paced(trainer):
        return lambda step, metrics: time.sleep(args["pause"])

    ray.init(logging_level="ERROR")  # RAY_ADDRESS and the token come from the environment
    result = launch(pretrain_job(cfg, args["checkpoints"], args["metrics"], args["export"], hooks=[paced]),
                    connect_ray=lambda: None)
    print(json.dumps({"checkpoint": result.checkpoint, "losses": result.worker["losses"]}))
""")


def test_pretraining_on_two_nodes_survives_losing_one_and_resumes_from_its_s3_checkpoint(
        tmp_path, ray_session, s3_bucket):
    """Two Ray Train workers, one per worker node (the head has no CPU for them), checkpoint to S3;
    node_c is killed once a checkpoint is on S3 and a replacement joins; Ray Train restarts both
    workers from that checkpoint and the run ends with the losses of an undisturbed run."""
    from llmray import storage
    from llmray.train.launch import launch
    from llmray.train.pretrain import pretrain_job
    from tests.ray.test_pretrain import CONFIGS, make_token_run, token_shards_on_s3

    tokens, tokenizer = token_shards_on_s3(make_token_run(tmp_path / "prep" / "run"), s3_bucket)
    overrides = [f"data.tokens={tokens}", f"tokenizer={tokenizer}", "execution.workers=2",
                 "execution.launcher=ray_train", "execution.cpus_per_worker=1", "execution.max_failures=2",
                 "train.steps=16", "train.checkpoint_every=4", "train.log_every=1", "train.eval_every=0"]
    raw = config_lib.apply_overrides(config_lib.read_yaml(CONFIGS / "tiny.yaml"), overrides)
    clean_cfg = stages.build_config(stages.STAGES["pretrain"], raw, str(tmp_path / "clean"))
    launch(pretrain_job(clean_cfg, tmp_path / "clean" / "ckpt", tmp_path / "clean" / "metrics.jsonl"),
           connect_ray=lambda: None)
    clean = {m["step"]: m["loss"] for m in map(json.loads, (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines())}

    run = storage.join(s3_bucket, "runs", "demo", "pretrain")
    checkpoints = storage.join(run, "work", "checkpoints")
    args = {"config": str(CONFIGS / "tiny.yaml"), "overrides": overrides, "root": storage.join(s3_bucket, "runs", "demo"),
            "checkpoints": checkpoints, "metrics": storage.join(run, "metrics.jsonl"),
            "export": storage.join(run, "output", "model"), "pause": 0.5}
    caches = {name: {"LLMRAY_CACHE_DIR": str(tmp_path / f"cache-{name}")} for name in ("node_b", "node_c")}
    cluster = LocalCluster(tmp_path, caches, head_cpus=0)
    try:
        driver = subprocess.Popen([sys.executable, "-c", PRETRAIN_DRIVER, json.dumps(args)], env=cluster.client_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = storage.join(checkpoints, "step_00000004", ".metadata")
        deadline = time.monotonic() + 240
        while not storage.exists(first):
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint reached S3"
            time.sleep(0.2)
        cluster.kill("node_c")
        cluster.replace("node_c")
        out, err = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.stop()
    assert driver.returncode == 0, err[-4000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["checkpoint"] == storage.join(checkpoints, "step_00000016")
    resumed_at = min(map(int, report["losses"])) - 1
    assert resumed_at in (4, 8, 12), report["losses"]  # the final attempt started from an S3 checkpoint
    logged = {m["step"]: m["loss"] for m in map(json.loads, storage.read_text(args["metrics"]).splitlines())}
    assert sorted(logged) == list(range(1, 17))
    assert logged == pytest.approx(clean, rel=1e-6, abs=1e-6)
    assert storage.is_file(storage.join(args["export"], "model.safetensors"))
    assert any((tmp_path / "cache-node_b").rglob("*.bin")), "node_b did not read the shards through its cache"


def test_the_tiny_pipeline_runs_on_the_cluster_with_its_run_directory_on_s3(tmp_path, s3_bucket, shared_data):
    """`llmray pipeline --runs-dir s3://...` from an empty directory, driving the 3-node cluster: every
    stage completes with its files on S3, a second run skips every stage from the manifests there,
    nothing is left in the working directory, and the report is rebuilt from S3 elsewhere."""
    from llmray import storage
    from tests.e2e.test_pipeline import ORDER, tiny_pipeline_raw

    raw = tiny_pipeline_raw(pretrain_steps=4)  # the demo's data paths are relative to the repository: made absolute
    for source in raw["stages"]["curate"]["sources"]:
        source["paths"] = [str(REPO / p) if not p.startswith("../") else p for p in source.get("paths", [])]
    raw["stages"]["eval"]["data_dir"] = str(shared_data)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False).replace("../shared/data", str(shared_data)))
    runs_dir = storage.join(s3_bucket, "runs")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    caches = {name: {"LLMRAY_CACHE_DIR": str(tmp_path / f"cache-{name}")} for name in ("node_b", "node_c")}
    # 2 CPUs a node: a node of 1 CPU that holds a 0.5-CPU classifier actor has no room left for
    # Ray Data's 1-CPU repartition tasks, and curate would wait forever
    cluster = LocalCluster(tmp_path, caches, cpus_per_node=2)

    def manifests() -> dict[str, dict]:
        return {stage: json.loads(storage.read_text(storage.join(runs_dir, "tiny", stage, "manifest.json")))
                for stage in ORDER}

    try:
        def pipeline() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "llmray.cli", "pipeline", "--config", str(config),
                                   "--runs-dir", runs_dir], cwd=workdir, env=cluster.client_env(),
                                  capture_output=True, text=True, timeout=1200)
        first = pipeline()
        assert first.returncode == 0, first.stderr[-5000:]
        before = manifests()
        assert all(m["status"] == "complete" for m in before.values())
        second = pipeline()
        assert second.returncode == 0, second.stderr[-5000:]
    finally:
        cluster.stop()
    assert manifests() == before, "the second run re-ran a stage"
    assert second.stderr.count("skipping") + second.stderr.count("skipped") >= len(ORDER), second.stderr[-3000:]
    assert list(workdir.iterdir()) == [], "the run left files in the working directory"
    model = storage.join(runs_dir, "tiny", "dpo", "output", "model", "model.safetensors")
    assert storage.is_file(model)

    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    report = subprocess.run([sys.executable, "-m", "llmray.cli", "report", "--runs-dir", runs_dir, "--run", "tiny"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert list(elsewhere.iterdir()) == []
    text = storage.read_text(storage.join(runs_dir, "tiny", "report", "report.md"))
    assert all(f"| {stage} | complete |" in text for stage in ORDER), text[:3000]

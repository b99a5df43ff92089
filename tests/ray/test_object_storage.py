"""Runs on object storage: ``--runs-dir s3://...`` and sources on S3, against a real S3 API (moto
server on 127.0.0.1), compared with the same run on local disk."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from llmray import cli, cluster, config as config_lib, runs, stages, storage

pytestmark = pytest.mark.ray


def corpus_files(shared_data: Path) -> dict[str, bytes]:
    """Relative path → bytes: real C4 lines with faults (bad JSON, bad UTF-8, a truncated gzip) and a
    WARC, so that quarantine and every reader that opens files by name are exercised."""
    with open(shared_data / "c4_sample" / "c4_demo.jsonl", "rb") as handle:
        lines = [next(handle).rstrip(b"\n") for _ in range(60)]
    whole = gzip.compress(b"\n".join(lines[40:60]) + b"\n")
    return {
        "jsonl/good_and_bad.jsonl": b"\n".join(lines[:15] + [b'{"text": "never closed', b'{"text": "\xff\xfe"}']
                                               + lines[15:40]) + b"\n",
        "jsonl/truncated.jsonl.gz": whole[: len(whole) * 3 // 4],
        "jsonl/skipped.txt": b"not matched by the glob",
        "web/crawl.warc.wet.gz": (shared_data / "web_cc_warc" / "whirlwind.warc.wet.gz").read_bytes(),
    }


def curate_config(root: str) -> dict:
    return {
        "sources": [
            {"name": "c4", "kind": "jsonl", "paths": [runs_path(root, "jsonl/*.jsonl*")]},
            {"name": "wet", "kind": "wet", "paths": [runs_path(root, "web")]},
        ],
        "sample_rejected": 1,
        "output": {"rows_per_file": 16, "row_group_rows": 8},
        "execution": {"batch_rows": 16},
    }


def run(stage: str, raw: dict, run_root: str) -> stages.StageResult:
    return stages.run_stage(stages.STAGES[stage], stages.build_config(stages.STAGES[stage], raw, run_root), run_root,
                            cluster.RayConfig())


def without_timings(data: bytes, name: str):
    """A JSON file without its wall-clock fields; any other file as it is."""
    if not name.endswith(".json"):
        return data

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if "seconds" not in k and k != "tokens_per_s"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    return strip(json.loads(data))


def runs_path(root: str, relative: str) -> str:
    return storage.join(root, relative)


def parquet_bytes(output: str) -> dict[str, bytes]:
    return {rel: storage.read_bytes(storage.join(output, rel)) for rel, _ in storage.list_files(output)
            if rel.endswith(".parquet") and not rel.startswith("quarantine/")}


def quarantine(output: str, root: str) -> list[dict]:
    """Quarantine rows with the source root cut from paths and messages (they name where the file is)."""
    rows = []
    for rel, _ in storage.list_files(storage.join(output, "quarantine")):
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, "quarantine", rel))))
        rows += [{k: v.replace(root, "<root>") if isinstance(v, str) else v for k, v in row.items()}
                 for row in table.to_pylist()]
    return rows


def test_curate_on_s3_equals_the_local_run_skips_when_unchanged_and_reports_from_s3(
        shared_data, ray_session, s3_bucket, tmp_path, monkeypatch):
    local_root, remote_root = str(tmp_path / "raw"), storage.join(s3_bucket, "raw")
    for rel, data in corpus_files(shared_data).items():
        storage.write_bytes(storage.join(local_root, rel), data)
        storage.write_bytes(storage.join(remote_root, rel), data)
    local = stages.run_stage(stages.STAGES["curate"],
                             config_lib.from_dict(stages.STAGES["curate"].config_cls, curate_config(local_root)),
                             tmp_path / "runs" / "demo", cluster.RayConfig())

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    config_file = tmp_path / "curate.yaml"
    config_file.write_text(yaml.safe_dump(curate_config(remote_root)))
    runs_dir = storage.join(s3_bucket, "runs")
    assert cli.main(["curate", "--config", str(config_file), "--runs-dir", runs_dir, "--run", "demo"]) == 0
    assert list(workdir.iterdir()) == [], "a run on S3 left files in the working directory"

    remote_output = storage.join(runs_dir, "demo", "curate", "output")
    local_output = str(local.output)
    assert parquet_bytes(remote_output) == parquet_bytes(local_output)
    assert len(parquet_bytes(local_output)) >= 3
    remote_quarantine = quarantine(remote_output, remote_root)
    assert remote_quarantine == quarantine(local_output, local_root)
    assert {row["error"] for row in remote_quarantine} >= {"JSONDecodeError", "InvalidUTF8", "EOFError"}
    funnel = json.loads(storage.read_text(storage.join(remote_output, "funnel.json")))
    assert funnel["totals"] == json.loads((local.output / "funnel.json").read_text())["totals"]

    for name, raw in (("tokenizer", {"vocab_size": 600}), ("tokens", {"plan": "actors", "shard_tokens": 4000})):
        on_s3 = run(name, raw, storage.join(runs_dir, "demo"))
        on_disk = run(name, raw, str(tmp_path / "runs" / "demo"))
        names = [rel for rel, _ in storage.list_files(on_s3.output)]
        assert names == [rel for rel, _ in storage.list_files(on_disk.output)] and len(names) >= 3
        for rel in (n for n in names if not n.endswith(".md")):  # .md: the .json beside it, with timings
            remote, local = (storage.read_bytes(storage.join(str(out), rel)) for out in (on_s3.output, on_disk.output))
            remote = remote.replace(runs_dir.encode(), str(tmp_path / "runs").encode())
            assert without_timings(remote, rel) == without_timings(local, rel), rel  # byte-identical but paths
    assert list(workdir.iterdir()) == []

    stage_root = storage.join(runs_dir, "demo", "curate")
    manifest = json.loads(storage.read_text(storage.join(stage_root, "manifest.json")))
    assert manifest["status"] == "complete"
    assert set(manifest["outputs"]) == {rel for rel, _ in storage.list_files(remote_output)}
    assert all(key.startswith("source.c4.") or key.startswith("source.wet.") for key in manifest["inputs"])
    assert all(entry["sha256"].startswith("stat:") for entry in manifest["inputs"].values())
    assert "skipped.txt" not in json.dumps(manifest["inputs"])
    assert {"config.yaml", "stage.log", "metrics.jsonl"} <= {rel for rel, _ in storage.list_files(stage_root)}
    assert "running stage curate in s3://" in storage.read_text(storage.join(stage_root, "stage.log"))

    again = stages.run_stage(stages.STAGES["curate"], config_lib.from_dict(
        stages.STAGES["curate"].config_cls, curate_config(remote_root)), storage.join(runs_dir, "demo"),
        cluster.RayConfig())
    assert again.skipped and "unchanged" in again.reason
    storage.write_bytes(storage.join(remote_root, "jsonl/good_and_bad.jsonl"), b'{"text": "changed"}\n')
    changed = stages.run_stage(stages.STAGES["curate"], config_lib.from_dict(
        stages.STAGES["curate"].config_cls, curate_config(remote_root)), storage.join(runs_dir, "demo"),
        cluster.RayConfig())
    assert not changed.skipped and "inputs changed: source.c4.good_and_bad.jsonl" in changed.reason

    metrics, bad = runs.StageDir(stage_root, "curate").read_metrics()
    assert not bad and [m["documents_out"] for m in metrics] == [
        manifest["summary"]["documents_out"], changed.manifest["summary"]["documents_out"]]

    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["report", "--runs-dir", runs_dir, "--run", "demo"]) == 0
    assert list(elsewhere.iterdir()) == []
    report_dir = storage.join(runs_dir, "demo", "report")
    report = storage.read_text(storage.join(report_dir, "report.md"))
    assert "| tokens | complete |" in report and "| curate | complete |" in report and f"| documents_out | {changed.manifest['summary']['documents_out']} |" \
        in report
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert linked and {rel for rel, _ in storage.list_files(report_dir)} == {"report.md", *linked}


def test_the_driver_receives_counts_not_documents(shared_data, ray_session, s3_bucket, monkeypatch):
    """Every batch that reaches the driver during curate (with dedup) is counted: none carries a
    text column, and all of them together are a small fraction of the curated text. Nothing the
    driver fetches with ``ray.get`` is per document either: no table of ids or texts (dedup's drops
    are joined with the rows on the cluster), no array with an entry per duplicate."""
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    lines = (shared_data / "c4_sample" / "c4_demo.jsonl").read_bytes()
    storage.write_bytes(storage.join(s3_bucket, "raw", "c4.jsonl"), lines + lines)  # 300 duplicates for dedup
    raw = {"sources": [{"name": "c4", "kind": "jsonl", "paths": [storage.join(s3_bucket, "raw", "c4.jsonl")]}],
           "dedup": {"exact": True, "decontam": {"enabled": False}},
           "output": {"rows_per_file": 200}, "signal_sample": 10, "execution": {"batch_rows": 32}}
    delivered = []
    iter_batches = ray.data.Dataset.iter_batches

    def counted(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            delivered.append((tuple(batch.column_names), batch.nbytes))
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", counted)
    fetched = []
    get = ray.get

    def recorded(refs, *args, **kwargs):
        values = get(refs, *args, **kwargs)
        for value in values if isinstance(refs, list) else [values]:
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, pa.Table) and {"id", "text"} & set(item.column_names):
                    fetched.append(("table", item.column_names, item.num_rows))
                elif isinstance(item, np.ndarray) and item.size > 16:
                    fetched.append(("array", item.dtype, item.size))
        return values

    monkeypatch.setattr(ray, "get", recorded)
    result = stages.run_stage(stages.STAGES["curate"], config_lib.from_dict(stages.STAGES["curate"].config_cls, raw),
                              storage.join(s3_bucket, "runs", "demo"), cluster.RayConfig())
    totals = result.manifest["summary"]
    assert totals["documents_out"] > 100 and totals["rejected"] >= 300  # duplicates dropped, files written
    assert delivered and all("text" not in columns for columns, _ in delivered)
    assert sum(size for _, size in delivered) < 0.03 * totals["bytes_out"], delivered
    assert fetched == []
    funnel = json.loads(storage.read_text(storage.join(result.output, "funnel.json")))
    assert 0 < funnel["signal_stats"]["gopher_quality.words"]["n"] <= 10 * len(delivered)


def model_inputs(shared_data: Path, tmp_path: Path, bucket: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """A tiny exported model and the test tokenizer: (model, tokenizer) on disk, and copied to S3."""
    from tests.align_support import export_tiny_model, tokenizer_dir

    local = str(export_tiny_model(tmp_path / "init", shared_data)), str(tokenizer_dir(shared_data))
    remote = storage.join(bucket, "init"), storage.join(bucket, "tokenizer")
    for folder, location in zip(local, remote):
        storage.upload_folder(Path(folder), location)
    return local, remote


def on_disk_then_on_s3(both, shared_data: Path, tmp_path: Path, bucket: str, monkeypatch) -> tuple[tuple, tuple]:
    """``both(run_root, model, tokenizer)`` run on disk, then from an empty working directory with the
    model, tokenizer and run directory on S3; the working directory must stay empty."""
    local, remote = model_inputs(shared_data, tmp_path, bucket)
    on_disk = both(str(tmp_path / "runs" / "demo"), *local)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    on_s3 = both(storage.join(bucket, "runs", "demo"), *remote)
    assert list(workdir.iterdir()) == [], "a run on S3 left files in the working directory"
    assert all(str(result.output).startswith("s3://") for result in on_s3)
    return on_disk, on_s3


def same_files_and_losses(local: stages.StageResult, remote: stages.StageResult, files: tuple[str, ...]) -> None:
    for rel in files:
        assert storage.read_bytes(storage.join(str(remote.output), rel)) == \
            storage.read_bytes(storage.join(str(local.output), rel)), rel

    def losses(result: stages.StageResult) -> dict[int, float]:
        stage_dir = runs.StageDir(storage.parent(str(result.output)), "x")
        return {m["step"]: m["loss"] for m in stage_dir.read_metrics()[0] if "loss" in m}

    assert losses(remote) == losses(local) != {}


def test_sft_then_dpo_on_s3_equal_the_local_runs_and_the_reference_cache_lives_there(
        shared_data, ray_session, s3_bucket, tmp_path, monkeypatch):
    """Initial model and tokenizer on S3, the run directory on S3 (checkpoints, export, samples,
    metrics, DPO's reference cache): the same weights, samples and losses as the runs on disk."""
    sft = {"batch": {"seq_len": 160, "micro_batch_size": 4}, "val_fraction": 0.1,
           "sources": [{"kind": "oasst", "path": str(shared_data / "oasst1_en_100" / "en_100_tree.jsonl")}],
           "train": {"steps": 4, "log_every": 2, "eval_every": 4, "eval_batches": 1, "optimizer": {"lr": 3e-3}},
           "samples": {"prompts": 2, "max_new_tokens": 6}}
    dpo = {"batch": {"seq_len": 160, "micro_batch_size": 4}, "val_fraction": 0.2, "metric_pairs": 16,
           "sources": [{"kind": "hh_rlhf", "path": str(shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz"),
                        "max_records": 20}],
           "reference": {"actors": 1, "actor_cpus": 0.5, "batch_size": 16},
           "train": {"steps": 4, "log_every": 2, "eval_every": 4, "eval_batches": 1}, "samples": {"prompts": 1,
                                                                                                "max_new_tokens": 6}}

    def both(root: str, model: str, tokenizer: str) -> tuple[stages.StageResult, stages.StageResult]:
        first = run("sft", {**sft, "model": model, "tokenizer": tokenizer}, root)
        second = run("dpo", {**dpo, "model": storage.join(str(first.output), "model"), "tokenizer": tokenizer}, root)
        return first, second

    on_disk, on_s3 = on_disk_then_on_s3(both, shared_data, tmp_path, s3_bucket, monkeypatch)
    for local, remote in zip(on_disk, on_s3):
        same_files_and_losses(local, remote, ("model/model.safetensors", "model/config.json", "samples.jsonl"))
    remote_root = storage.join(s3_bucket, "runs", "demo")
    assert storage.list_dirs(storage.join(remote_root, "dpo", "reference_cache"))
    again = run("dpo", {**dpo, "model": storage.join(str(on_s3[0].output), "model"),
                        "tokenizer": storage.join(s3_bucket, "tokenizer"), "train": {**dpo["train"], "steps": 2}},
                remote_root)
    assert again.manifest["summary"]["reference"]["train"]["cache_hit"] is True


def test_reward_model_then_rl_on_s3_equal_the_local_runs(shared_data, ray_session, s3_bucket, tmp_path, monkeypatch):
    """Policy, tokenizer and run directory on S3: the reward model trains there, and RL scores its
    rollouts with that model read from S3 by the rollout actors; the same weights and losses as the
    runs on disk, and nothing left in the working directory."""
    reward = {"batch": {"seq_len": 127, "micro_batch_size": 8}, "val_fraction": 0.2,
              "sources": [{"kind": "hh_rlhf", "path": str(shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz"),
                           "max_records": 40}],
              "train": {"steps": 3, "log_every": 1, "peak_flops": 1e11}, "execution": {"threads_per_worker": 1}}
    rl = {"prompts": [{"kind": "arithmetic", "level": 1, "count": 40}], "eval_problems": 2, "max_staleness": 0,
          "prompts_per_step": 2, "group_size": 4, "micro_batch_size": 4, "sampling": {"max_new_tokens": 6},
          "rollout": {"actors": 1, "actor_cpus": 0.25},
          "train": {"steps": 2, "log_every": 1, "peak_flops": 1e11, "optimizer": {"lr": 3e-3}},
          "execution": {"launcher": "process", "threads_per_worker": 1}}

    def both(root: str, model: str, tokenizer: str) -> tuple[stages.StageResult, stages.StageResult]:
        first = run("reward", {**reward, "model": model, "tokenizer": tokenizer}, root)
        scorer = {"kind": "reward_model", "model": storage.join(str(first.output), "model"), "format_weight": 0.0}
        return first, run("rl", {**rl, "model": model, "tokenizer": tokenizer, "reward": scorer}, root)

    on_disk, on_s3 = on_disk_then_on_s3(both, shared_data, tmp_path, s3_bucket, monkeypatch)
    for local, remote in zip(on_disk, on_s3):
        same_files_and_losses(local, remote, ("model/model.safetensors",))
    rollouts = [json.loads(storage.read_text(storage.join(str(r.output), "rollouts.json"))) for r in (on_disk[1], on_s3[1])]
    assert [h["reward_mean"] for h in rollouts[0]] == [h["reward_mean"] for h in rollouts[1]]
    assert "held-out greedy exact match" in storage.read_text(storage.join(str(on_s3[1].output), "report.md"))

"""``llmray tune`` on the session's Ray: an LR sweep of the proxy trainer with ASHA (early stops, a
sensible winner, a bad value errored with its message while the sweep goes on), a sweep whose
driver is killed, refused a fresh start over it, and resumed without re-running finished trials,
and a sweep whose run directory is on S3.

Trials train a tiny Llama on real text (Python standard-library sources as byte tokens) through
the one training core; nothing is mocked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmray import stages, storage
from tests.train_support import stdlib_texts, write_byte_shards

pytestmark = pytest.mark.ray
REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 60


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_byte_shards(tmp_path_factory.mktemp("tune") / "shards", stdlib_texts(12), val_every=4)


def proxy_stage(shards: Path, steps: int = STEPS) -> dict:
    return {"data": {"tokens": str(shards)}, "tokenizer": None,
            "model": {"vocab_size": 257, "dim": 32, "n_layers": 1, "n_heads": 2, "ffn_hidden_dim": 64,
                      "max_seq_len": 64},
            "batch": {"seq_len": 32, "micro_batch_size": 8},
            "train": {"steps": steps, "log_every": 10, "eval_every": 10, "eval_batches": 2,
                      "schedule": {"warmup_steps": 5}}}


def run_tune(raw: dict, run_root: Path) -> stages.StageResult:
    stage = stages.STAGES["tune"]
    return stages.run_stage(stage, stages.build_config(stage, raw, run_root), run_root)


def read_rows(output: Path | str) -> dict[str, dict]:
    return {row["trial_id"]: row for row in csv.DictReader(io.StringIO(storage.read_text(f"{output}/trials.csv")))}


def test_lr_sweep_asha_stops_bad_trials_and_reports_a_bad_value(ray_session, shards, tmp_path):
    lrs = [3e-2, 1e-5, 30.0, -1.0]  # -1 is out of range: that trial must error, the rest go on
    raw = {"stages": {"proxy": proxy_stage(shards)},
           "space": {"proxy.train.optimizer.lr": {"grid": lrs}},
           "metric": "val_loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 2,
           "scheduler": {"kind": "asha", "max_t": STEPS, "grace_period": 10, "reduction_factor": 2}}
    result = run_tune(raw, tmp_path / "lr")
    rows = read_rows(result.output)
    by_lr = {float(row["proxy.train.optimizer.lr"]): row for row in rows.values()}
    assert set(by_lr) == set(lrs)

    bad = by_lr[-1.0]
    assert bad["status"] == "error" and "in stage proxy: train.optimizer.lr: value -1.0 is out of range" in bad["error"]
    finished = [row for lr, row in by_lr.items() if lr != -1.0]
    stopped = [row for row in finished if row["status"] == "stopped"]
    assert stopped and all(int(row["steps"]) < STEPS for row in stopped), rows  # ASHA stopped some early
    assert any(row["status"] == "completed" and int(row["steps"]) == STEPS for row in finished)
    summary = result.manifest["summary"]
    best_lr = summary["best_config"]["proxy.train.optimizer.lr"]
    assert best_lr not in (30.0, 1e-5), rows  # neither the divergent nor the stalled end of the range
    assert by_lr[best_lr]["status"] == "completed"

    best = yaml.safe_load((result.output / "best_config.yaml").read_text())
    assert best["train"]["optimizer"]["lr"] == best_lr
    assert stages.build_config(stages.STAGES["proxy"], best, tmp_path).train.optimizer.lr == best_lr
    for name in ("metric_vs_step.png", "metric_vs_keys.png", "trials.md", "report.md"):
        assert (result.output / name).stat().st_size > 0
    report = (result.output / "report.md").read_text()
    assert "out of range" in report and "best_config.yaml" in report
    record = json.loads((tmp_path / "lr" / "tune" / "work" / "ray_results" / "sweep.json").read_text())
    assert record["finished"]  # a rerun (changed config, --force) starts a new sweep rather than restore this one


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_session, shards, tmp_path):
    raw = {"stages": {"proxy": proxy_stage(shards, steps=40)},
           "space": {"proxy.train.optimizer.lr": {"grid": [1e-3, 2e-3, 4e-3, 8e-3]}},
           "num_samples": 1, "max_concurrent_trials": 1, "scheduler": {"kind": "fifo"}}
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(json.dumps(raw))
    runs_dir = tmp_path / "runs"
    command = [sys.executable, "-m", "llmray.cli", "tune", "--config", str(config_file), "--run", "sweep",
               "--runs-dir", str(runs_dir)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.address, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    trials = runs_dir / "sweep" / "tune" / "work" / "trials"
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finished() -> set[str]:
        done = set()
        for record in trials.glob("*/trial.json"):
            data = json.loads(record.read_text())
            if len(data["stages"]) == 1 and not data["error"]:
                done.add(record.parent.name)
        return done

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(finished()) < 2:
        time.sleep(0.2)
    time.sleep(1.5)  # let the driver record the finished trials in its experiment state
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = finished()
    assert 2 <= len(before) < 4

    with pytest.raises(FileExistsError, match="holds an interrupted sweep, which resume=false does not delete"):
        run_tune({**raw, "resume": False}, runs_dir / "sweep")
    result = run_tune(raw, runs_dir / "sweep")  # resume=auto, the default
    rows = read_rows(result.output)
    assert len(rows) == 4 and all(row["status"] == "completed" for row in rows.values()), rows
    for trial_id in before:
        attempts = (trials / trial_id / "attempts.jsonl").read_text().splitlines()
        assert len(attempts) == 1, f"finished trial {trial_id} ran again"
    assert set(rows) >= before
    lineage = json.loads((result.output / "lineage.json").read_text())
    assert set(lineage["trials"]) == set(rows)


def test_a_sweep_on_s3_keeps_everything_there_and_is_skipped_when_run_again(ray_session, shards, s3_bucket,
                                                                            tmp_path, monkeypatch):
    """``--runs-dir s3://...`` for a sweep: the trials' stage slots and records, the Tune experiment
    and the results are all in the bucket, each trial ends as the same sweep does on disk, the
    working directory stays empty, and a second run is skipped from the manifest on S3."""
    raw = {"stages": {"proxy": proxy_stage(shards, steps=20)},
           "space": {"proxy.train.optimizer.lr": {"grid": [3e-2, 1e-3]}},
           "metric": "val_loss", "mode": "min", "num_samples": 1, "max_concurrent_trials": 2,
           "scheduler": {"kind": "fifo"}}
    local = run_tune(raw, tmp_path / "local")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    root = storage.join(s3_bucket, "runs", "sweep")
    remote = run_tune(raw, root)
    assert str(remote.output).startswith("s3://") and list(workdir.iterdir()) == []

    def outcome(rows: dict[str, dict]) -> dict[str, tuple]:
        return {row["proxy.train.optimizer.lr"]: (row["status"], row["steps"], row["val_loss"]) for row in rows.values()}

    assert outcome(read_rows(remote.output)) == outcome(read_rows(local.output))
    assert {status for status, _, _ in outcome(read_rows(remote.output)).values()} == {"completed"}
    work = storage.join(root, "tune", "work")
    slots = [name for name in storage.list_dirs(storage.join(work, "stages")) if name.startswith("proxy-")]
    assert len(slots) == 2 and all(
        json.loads(storage.read_text(storage.join(work, "stages", slot, "proxy", "manifest.json")))["status"]
        == "complete" for slot in slots)
    assert json.loads(storage.read_text(f"{remote.output}/lineage.json"))["stages"]["proxy"] == \
        {"keys": 2, "ran": 2, "reused": 0}
    assert storage.list_files(storage.join(work, "ray_results", "sweep")), "the Tune experiment is not on S3"
    for name in ("best_config.yaml", "report.md", "metric_vs_step.png"):
        assert storage.size(f"{remote.output}/{name}") > 0

    again = run_tune(raw, root)
    assert again.skipped and list(workdir.iterdir()) == []

"""Stages recorded in MLflow (a local file store, offline): config as params, metrics.jsonl as metrics, status."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from llmray import stages  # noqa: E402
from llmray.tokenizer.train import TokenizerConfig  # noqa: E402
from llmray.tracking import TrackingConfig, flatten, metric_points  # noqa: E402


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> TrackingConfig:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset below; restored to absent after the test")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # naming a file: URI must be enough
    return TrackingConfig(mlflow_uri=(tmp_path / "mlruns").as_uri(), experiment="llmray-test")


def documents(directory: Path) -> Path:
    directory.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(directory / "docs.jsonl", "w", encoding="utf-8") as handle:
        for path in sorted(stdlib.glob("[a-c]*.py"))[:12]:
            handle.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n")
    return directory


def only_run(client: MlflowClient, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_a_finished_stage_is_an_mlflow_run_with_its_config_and_metrics(tmp_path, file_store):
    cfg = TokenizerConfig(documents=str(documents(tmp_path / "docs")), vocab_size=300, char_budget=20_000,
                          report_chars=2000, val_fraction=0.1)
    result = stages.run_stage(stages.STAGES["tokenizer"], cfg, tmp_path / "run-a", tracking=file_store)
    client = MlflowClient(tracking_uri=file_store.mlflow_uri)
    run = only_run(client, "llmray-test")
    assert result.manifest["mlflow"]["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a/tokenizer"
    assert run.data.tags["llmray.stage"] == "tokenizer"
    assert run.data.tags["llmray.config_sha256"] == result.manifest["config_sha256"]
    assert run.data.params["vocab_size"] == "300" and run.data.params["source_weights"] == "{}"
    (logged,) = [json.loads(line) for line in (tmp_path / "run-a" / "tokenizer" / "metrics.jsonl").open()]
    expected = {k: v for k, v in logged.items() if k != "time" and isinstance(v, (int, float))}
    assert set(expected) >= {"train_seconds", "train_chars"}
    assert run.data.metrics == pytest.approx(expected)


def test_a_failed_stage_is_recorded_as_failed(tmp_path, file_store):
    (tmp_path / "empty").mkdir()
    cfg = TokenizerConfig(documents=str(tmp_path / "empty"), vocab_size=300, char_budget=20_000, report_chars=2000)
    with pytest.raises(Exception):
        stages.run_stage(stages.STAGES["tokenizer"], cfg, tmp_path / "run-b", tracking=file_store)
    run = only_run(MlflowClient(tracking_uri=file_store.mlflow_uri), "llmray-test")
    assert run.info.status == "FAILED" and run.info.run_name == "run-b/tokenizer"
    manifest = json.loads((tmp_path / "run-b" / "tokenizer" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["mlflow"]["run_id"] == run.info.run_id


def test_training_records_keep_their_steps_and_stage_records_their_order():
    records = [{"time": 10.0, "step": 5, "loss": 2.5, "tag": "x", "ok": True},
               {"time": 11.0, "step": 5, "eval/copa/acc": 0.5},
               {"time": 12.0, "seconds": 3, "bad": float("nan")}]
    assert list(metric_points(records)) == [("loss", 2.5, 10_000, 5), ("eval/copa/acc", 0.5, 11_000, 5),
                                            ("seconds", 3.0, 12_000, 2)]
    assert dict(flatten({"train": {"optimizer": {"lr": 0.003}, "tags": ["a"]}, "name": None})) == {
        "train.optimizer.lr": "0.003", "train.tags": '["a"]', "name": "null"}

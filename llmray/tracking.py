"""Optional experiment tracking: each stage of a run becomes one MLflow run, with its config and metrics.

Why MLflow, and why at the end of a stage: teams that track experiments in MLflow want llmray
runs beside their others without reading our run directories. ``metrics.jsonl`` stays the one
record every writer appends to (the driver, training rank 0, in-training evaluations), so it is
what goes to MLflow when the stage ends, successful or not: the same numbers as the report, one
writer to MLflow, and nothing to set up on the workers. Live figures during a stage are the Ray
dashboard's (:mod:`llmray.dashboard_metrics`).

What an MLflow run holds (experiment ``tracking.experiment``, created when missing; run name
``<run>/<stage>``):

* params: the stage's resolved config, flattened to dotted keys (``train.optimizer.lr``);
* metrics: every finite number of every ``metrics.jsonl`` record, at the record's ``step`` (the
  record's position for stage-level records without one) and time;
* tags: ``llmray.run``, ``llmray.stage``, ``llmray.config_sha256``, ``llmray.stage_dir``;
* status: FINISHED, or FAILED when the stage raised.

``mlflow_uri`` may be a server (``http://host:5000``), ``databricks`` or a local store
(``file:///path``; MLflow 3 keeps that backend in maintenance mode behind
``MLFLOW_ALLOW_FILE_STORE``, which naming a ``file:`` URI here opts into). Only the client is
needed (``mlflow-skinny``), imported when tracking is on.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from llmray.config import param

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = {"metrics": 1000, "params": 100}  # MLflow's limits per log_batch call


@dataclass
class TrackingConfig:
    """Where a run's stages are recorded besides their run directory."""

    mlflow_uri: str | None = param(None, doc="MLflow tracking URI (http://host:5000, databricks, file:///path); "
                                             "null = no MLflow")
    experiment: str = param("llmray", doc="MLflow experiment of the run's stages (created when missing)")

    @property
    def enabled(self) -> bool:
        return bool(self.mlflow_uri)


def flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value as text) of every leaf of a config dict; lists are written as JSON."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        text = data if isinstance(data, str) else json.dumps(data)
        yield prefix, text[:MAX_PARAM_CHARS]


def metric_points(records: list[dict]) -> Iterator[tuple[str, float, int, int]]:
    """(key, value, timestamp ms, step) of every finite number in ``records`` (``time``/``step`` excluded)."""
    for index, record in enumerate(records):
        step = int(record.get("step", index))
        timestamp = int(float(record.get("time", time.time())) * 1000)
        for key, value in record.items():
            if key in ("time", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                yield key, float(value), timestamp, step


def log_stage(cfg: TrackingConfig, *, run: str, stage: str, config: dict, metrics: list[dict],
              tags: dict[str, str], failed: bool = False) -> dict[str, str]:
    """Record one finished (or failed) stage as an MLflow run; its experiment and run ids."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus

    if cfg.mlflow_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # naming a file store is the opt-in
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    mlflow_run = client.create_run(experiment_id, run_name=f"{run}/{stage}",
                                   tags={"llmray.run": run, "llmray.stage": stage, **tags})
    run_id = mlflow_run.info.run_id
    params = [Param(key, value) for key, value in flatten(config)]
    points = [Metric(key, value, timestamp, step) for key, value, timestamp, step in metric_points(metrics)]
    for i in range(0, len(params), BATCH["params"]):
        client.log_batch(run_id, params=params[i:i + BATCH["params"]])
    for i in range(0, len(points), BATCH["metrics"]):
        client.log_batch(run_id, metrics=points[i:i + BATCH["metrics"]])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))
    return {"uri": cfg.mlflow_uri, "experiment_id": experiment_id, "run_id": run_id}

"""Ray Train wiring: run a per-worker training function on a ``TorchTrainer`` (Ray Train V2 APIs).

This is the only training module that imports Ray. It turns :class:`RayTrainConfig` into
``ScalingConfig`` / ``RunConfig(name, storage_path)`` / ``CheckpointConfig(num_to_keep)`` /
``FailureConfig(max_failures)`` and provides :class:`RayCheckpointStore`, the trainer's store
inside a worker:

* each rank writes its part of a checkpoint into a node-local temp directory and hands it to
  ``ray.train.report(..., checkpoint_dir_name="step_N")``; Ray merges the ranks' files into one
  directory under ``storage_path/name`` and registers it only when every rank has reported;
* ``latest()`` is ``ray.train.get_checkpoint()`` (the newest registered checkpoint, kept up to
  date during the run, which the guard's rollback uses) checked with
  :func:`~llmray.train.checkpoint.is_complete`; an incomplete one falls back to the newest
  complete sibling ``step_*`` directory.

Resuming is Ray Train V2's: reusing the same ``RunConfig(name, storage_path)`` restarts from the
run's latest checkpoint (``resume_from_checkpoint`` is deprecated). Worker failures are retried
up to ``max_failures`` times, each time from the latest checkpoint; a worker SIGKILLed just
after reporting may come back from the checkpoint before, which exact resume makes harmless.
gloo is used on CPU and NCCL on GPU (TorchTrainer's default per device).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmray.config import param
from llmray.train import checkpoint as ckpt


@dataclass
class RayTrainConfig:
    """Workers, retries and checkpoint retention of the Ray Train run."""

    num_workers: int = param(1, doc="data-parallel training workers (one process each)", min=1)
    use_gpu: bool | None = param(None, doc="one GPU per worker; null = when the cluster has GPUs")
    cpus_per_worker: float = param(1.0, doc="CPUs Ray reserves per worker (fractions allowed)", min=0.01)
    resources_per_worker: dict[str, float] = param(default_factory=dict,
                                                   doc="extra custom resources per worker")
    threads_per_worker: int | None = param(None, doc="torch threads per worker; null = cpus_per_worker "
                                                     "rounded down (at least 1)", min=1)
    max_failures: int = param(2, doc="worker-group restarts from the latest checkpoint before the run fails",
                              min=0)
    num_to_keep: int = param(2, doc="checkpoints kept in storage (older ones are deleted)", min=1)
    storage_path: str | None = param(None, doc="where checkpoints go (shared storage on a multi-node "
                                               "cluster); null = the stage's work directory")
    name: str | None = param(None, doc="Ray Train run name; reusing it resumes; null = <run>-<stage>")


class TrainingFailed(RuntimeError):
    """The Ray Train run failed (after its retries); the message carries the workers' error."""


@dataclass
class RayRun:
    """What a finished run left: its latest complete checkpoint and last reported metrics."""

    checkpoint: Path | None
    metrics: dict = field(default_factory=dict)
    storage: Path | None = None
    value: Any = None  # what rank 0's training function returned


class RayCheckpointStore:
    """The trainer's :class:`~llmray.train.checkpoint.CheckpointStore` inside a Ray Train worker."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self.log = log

    def staging_dir(self, step: int) -> Path:
        return ckpt.local_staging_dir(step)

    def commit(self, step: int, directory: Path, metrics: dict) -> None:
        import ray.train

        try:
            ray.train.report(_plain(metrics), checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=ckpt.step_dir_name(step))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(_plain(metrics))

    def latest(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        path = Path(checkpoint.path)
        if not path.is_dir():  # remote storage: download the registered checkpoint only
            path = Path(checkpoint.to_directory())
            return ckpt.latest_complete([path], self.log)
        older = [p for p in ckpt.checkpoint_dirs(path.parent) if p.name < path.name]
        return ckpt.latest_complete([path, *older], self.log)


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def worker_setup(cfg: RayTrainConfig) -> None:
    """Per-worker process settings; call first in the training function."""
    import torch

    threads = cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))
    torch.set_num_threads(threads)


def world() -> tuple[int, int]:
    import ray.train

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def fit(train_fn: Callable[[dict], None], loop_config: dict[str, Any], cfg: RayTrainConfig, *,
        name: str, storage_path: Path) -> RayRun:
    """Run ``train_fn(loop_config)`` on ``cfg.num_workers`` Ray Train workers; resume a run of the same name."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             worker_runtime_env={"env_vars": _worker_env()}),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - re-raised with the run's context
        raise TrainingFailed(f"Ray Train run {name!r} failed after {cfg.max_failures} allowed worker "
                             f"failure(s) (ray.max_failures); checkpoints are in {storage_path / name}: "
                             f"{type(exc).__name__}: {exc}") from exc
    run_dir = storage_path / name
    latest = ckpt.latest_complete(ckpt.checkpoint_dirs(run_dir))
    return RayRun(checkpoint=latest, metrics=dict(result.metrics or {}), storage=run_dir,
                  value=result.return_value)


def _worker_env() -> dict[str, str]:
    from llmray.parallel.deepspeed import extensions_dir

    return {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(extensions_dir()))}

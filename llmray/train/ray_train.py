"""Ray Train wiring: run a per-worker training function on a ``TorchTrainer`` (Ray Train V2 APIs).

With the in-training evaluation's actor (``periodic_eval.py``), this is the only training module
that uses Ray. It turns an :class:`~llmray.train.launch.ExecutionConfig` into
``ScalingConfig`` / ``RunConfig(name, storage_path)`` / ``CheckpointConfig(num_to_keep)`` /
``FailureConfig(max_failures)`` and provides :class:`RayCheckpointStore`, the trainer's store
inside a worker:

* each rank writes its part of a checkpoint into a node-local temp directory and hands it to
  ``ray.train.report(..., checkpoint_dir_name="step_N")``; Ray merges the ranks' files into one
  directory under ``storage_path/name`` and registers it only when every rank has reported;
* ``latest()`` is the newest complete ``step_*`` folder no newer than
  ``ray.train.get_checkpoint()`` (the newest registered checkpoint, kept up to date during the
  run, which the guard's rollback uses), checked with
  :func:`~llmray.train.checkpoint.is_complete`;
* ``storage_path`` may be a URI (``s3://bucket/runs``): Ray uploads each rank's part through
  the same pyarrow filesystem llmray uses (:mod:`llmray.storage`), and a worker reads a
  checkpoint back through its node's cached copy, so a run on nodes without a shared
  filesystem restarts on any node.

Resuming is Ray Train V2's: reusing the same ``RunConfig(name, storage_path)`` restarts from the
run's latest checkpoint (``resume_from_checkpoint`` is deprecated). Worker failures are retried
up to ``max_failures`` times, each time from the latest checkpoint; a worker SIGKILLed just
after reporting may come back from the checkpoint before, which exact resume makes harmless.
gloo is used on CPU and NCCL on GPU (TorchTrainer's default per device).

The console shows one line per logged step and nothing per ``ray.train.report``: Ray Train V2
patches ``print`` in its workers to tee every line to stderr *and* to the root logger (each line
twice on the driver's console), and logs every report's full result dict at INFO from a logger
named after its source file, which ``LoggingConfig(log_level)`` (it covers ``ray.train.*`` only)
does not reach. So the workers run with ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``, Ray Train's own
loggers at ``WARNING`` (:data:`TRAIN_LOG_LEVEL`), and :func:`quiet_worker_logging` sets the
worker's root logger to ``WARNING`` with ``llmray`` kept at ``INFO``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmray import cluster, storage
from llmray.train import checkpoint as ckpt

if TYPE_CHECKING:
    from llmray.train.launch import ExecutionConfig


class RayCheckpointStore:
    """The trainer's :class:`~llmray.train.checkpoint.CheckpointStore` inside a Ray Train worker."""

    def __init__(self, root: str, log: Callable[[str], None] | None = None):
        self.root, self.log = root, log  # the run's folder (storage_path/name): a local path or a URI

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
        """The newest complete checkpoint no newer than the one Ray registered (a remote one is
        copied to this node); with none registered, whatever an in-process run left in the folder."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        newest = None if checkpoint is None else storage.name(checkpoint.path)
        return ckpt.latest_in(self.root, self.log, newest=newest)


TRAIN_LOG_LEVEL = "WARNING"


def quiet_worker_logging() -> None:
    """In a Ray Train worker: only warnings from other libraries, llmray's own lines at INFO."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("llmray").setLevel(logging.INFO)


class TrainingFailed(RuntimeError):
    """A training run failed (after its retries) or left no complete checkpoint; the message says where and why."""


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def fit(train_fn: Callable[[dict], Any], loop_config: dict[str, Any], cfg: ExecutionConfig, *,
        name: str, storage_path: str) -> Any:
    """Run ``train_fn(loop_config)`` on ``cfg.workers`` Ray Train workers and return rank 0's value; a run of
    the same ``storage_path/name`` (a local folder or a URI) resumes from its latest checkpoint."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    filesystem, path = storage.resolve(storage_path)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": cfg.cpus_per_worker, **cfg.resources_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = _trainer_class()(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=path,
                             storage_filesystem=filesystem if storage.is_remote(storage_path) else None,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL),
                             worker_runtime_env={"env_vars": _worker_env()}),
    )
    try:
        return trainer.fit().return_value
    except Exception as exc:  # noqa: BLE001 - re-raised with the run's context
        raise TrainingFailed(f"Ray Train run {name!r} failed after {cfg.max_failures} allowed worker "
                             f"failure(s) (execution.max_failures); checkpoints are in {storage.join(storage_path, name)}: "
                             f"{type(exc).__name__}: {exc}") from exc


def _trainer_class() -> type:
    """``TorchTrainer``, less its placement-group cleaner on a Ray without a dashboard.

    The cleaner, a detached actor per run, asks Ray's State API every second whether the run's
    controller still lives, to remove the run's placement group if it died. Without a dashboard
    there is no State API: the cleaner could never see a death, logged a warning every second, and,
    with a stale /tmp/ray/ray_current_cluster, held the end of every run for 12 s.
    """
    from ray.train.torch import TorchTrainer

    if cluster.serves_state_api():
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class TorchTrainerWithoutStateApi(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    return TorchTrainerWithoutStateApi


def _worker_env() -> dict[str, str]:
    from llmray.parallel.deepspeed import extensions_dir

    return {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(extensions_dir())),
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

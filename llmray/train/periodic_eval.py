"""In-training evaluation: benchmark scores of the checkpoints of a run while it keeps training.

A stage enables it with an ``eval`` section (:class:`TrainingEvalConfig`: an ``llmray eval``
config, usually ``include: ../eval/tiny.yaml``, plus ``every``). Every ``every`` steps and at the
last step:

1. all ranks meet at a barrier after the step's checkpoint is committed (so every rank's shard
   is on storage), then rank 0 exports that checkpoint in Hugging Face layout (DCP reshards on
   load, so any parallel layout exports the same weights) and hands it to the coordinator;
2. the coordinator, a zero-CPU Ray actor started by the driver, submits it to
   :class:`~llmray.eval.background.BackgroundEvaluator`, which scores it as a Ray task on the
   runner's own resources (``runner.num_cpus_per_actor`` / ``num_gpus_per_actor``: fractions
   beside the training workers) and writes ``<stage>/evals/step_N/`` like ``llmray eval``;
3. rank 0 polls the coordinator at its logged steps and writes finished scores into
   ``metrics.jsonl`` at the step they belong to (``eval/<task>/<metric>``, ``eval/core``), with
   one console line; the driver collects the rest after training (an evaluation still waiting
   for CPUs the workers held finishes then) and writes them the same way.

Exported weights go to ``<evals>/weights/step_N`` and are deleted once scored (the checkpoint
stays the durable artifact); results to ``<evals>/step_N``.

Why an actor owns the evaluations, not rank 0: tasks are owned by the process that submits them,
and training workers exit (or are restarted after a failure) while evaluations are still
running.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from llmray.config import param
from llmray.eval.stage import EvalConfig
from llmray.train import checkpoint as ckpt
from llmray.train.metrics import EVAL_PREFIX, format_evaluation


@dataclass
class TrainingEvalConfig(EvalConfig):
    """An ``llmray eval`` config (tasks, limit, runner resources) scored every ``every`` steps while training."""

    every: int = param(100, doc="evaluate the checkpoint of every this many steps (a multiple of "
                                "train.checkpoint_every: checkpoints are what is scored) and of the last step",
                       min=1)

    def check_schedule(self, checkpoint_every: int) -> None:
        if not checkpoint_every or self.every % checkpoint_every:
            raise ValueError(f"eval.every ({self.every}) must be a multiple of train.checkpoint_every "
                             f"({checkpoint_every}): in-training evaluation scores the checkpoints")


class EvalCoordinator:
    """Ray actor body: owns the background evaluations of one training run and their results."""

    def __init__(self, cfg: EvalConfig, output_root: str, chat: bool):
        from llmray.eval.background import BackgroundEvaluator

        self.evaluator = BackgroundEvaluator(cfg, output_root, chat)
        self.models: dict[str, str] = {}  # evaluation name -> exported weights, deleted once scored
        self.history: list[dict] = []

    def submit(self, step: int, model_dir: str) -> None:
        name = ckpt.step_dir_name(step)
        self.models[name] = model_dir
        self.evaluator.submit(name, model_dir)

    def poll(self) -> list[dict]:
        """Records (``step`` + ``eval/...`` scores) of the evaluations finished since the last call."""
        return self._records(self.evaluator.poll())

    def wait(self) -> list[dict]:
        """Wait for every evaluation; the records not returned by :meth:`poll` yet."""
        return self._records(self.evaluator.wait())

    def results(self) -> list[dict]:
        """Every record of this run, in the order they finished."""
        return list(self.history)

    def _records(self, finished: dict[str, dict[str, float]]) -> list[dict]:
        records = []
        for name, metrics in finished.items():
            shutil.rmtree(self.models.pop(name), ignore_errors=True)
            records.append({"step": int(name.rsplit("_", 1)[1]),
                            **{EVAL_PREFIX + key: value for key, value in metrics.items()}})
        self.history.extend(records)
        return records


def start_coordinator(cfg: TrainingEvalConfig, output_root: Path, chat: bool):
    """The coordinator actor (on the driver's connected Ray; it reserves no CPU)."""
    import ray

    return ray.remote(num_cpus=0)(EvalCoordinator).remote(cfg, str(output_root), chat)


def finish(coordinator: Any, metrics_path: str | None) -> list[dict]:
    """After training: wait for the evaluations still running, write them like rank 0 does; every record."""
    import ray

    from llmray.train.metrics import MetricsWriter

    write_records(ray.get(coordinator.wait.remote()), MetricsWriter(metrics_path, None))
    return ray.get(coordinator.results.remote())


def stop(coordinator: Any) -> None:
    """End the coordinator (evaluations not collected by :func:`finish`, after a failure, are cancelled)."""
    import ray

    ray.kill(coordinator)


def write_records(records: list[dict], writer) -> None:
    """Finished evaluations into metrics.jsonl (at their own step) and one console line each."""
    for record in records:
        step, scores = record["step"], {k: v for k, v in record.items() if k != "step"}
        writer.write(step, scores, console=False)
        writer.say(format_evaluation(step, scores))


class PeriodicEval:
    """Trainer hook (every rank): export and submit the checkpoint at evaluation steps; rank 0 logs results."""

    def __init__(self, trainer, coordinator: Any, cfg: TrainingEvalConfig, checkpoint_dir: Path, weights_dir: Path,
                 export: Callable[..., None]):
        self.trainer, self.coordinator, self.cfg = trainer, coordinator, cfg
        self.checkpoint_dir, self.weights_dir = checkpoint_dir, weights_dir
        self.export = export  # export(checkpoint, out_dir=...): a checkpoint in Hugging Face layout

    def __call__(self, step: int, metrics: dict) -> None:
        import ray

        if step and (step % self.cfg.every == 0 or step == self.trainer.cfg.steps):
            self._submit(step)
        if self.trainer.rank == 0 and self.trainer.writer is not None and step % self.trainer.cfg.log_every == 0:
            write_records(ray.get(self.coordinator.poll.remote()), self.trainer.writer)

    def _submit(self, step: int) -> None:
        import ray

        if dist.is_initialized():
            dist.barrier()  # every rank has committed its part of this step's checkpoint
        if self.trainer.rank != 0:
            return
        checkpoint = self.checkpoint_dir / ckpt.step_dir_name(step)
        complete, why = ckpt.is_complete(checkpoint)
        if not complete:
            raise RuntimeError(f"in-training evaluation at step {step}: checkpoint {checkpoint} is not complete "
                               f"({why})")
        out = self.weights_dir / ckpt.step_dir_name(step)
        self.export(checkpoint, out_dir=out)
        ray.get(self.coordinator.submit.remote(step, str(out)))

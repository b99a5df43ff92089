"""In-training evaluation: score each checkpoint the trainer saves, on Ray, without blocking training.

In-training evaluation (a training stage's ``eval`` section, :mod:`llmray.train.periodic_eval`)
calls :meth:`BackgroundEvaluator.submit` with each exported checkpoint directory, from a
coordinator actor that outlives the training workers. ``submit`` only launches a Ray task and
returns: the task runs the ordinary evaluation (:func:`llmray.eval.stage.evaluate_to`, so the
files are the same as ``llmray eval``'s) on its **own actor pool**, separate from the training
workers, and writes ``<output_root>/<name>/`` atomically. Finished results are collected with
:meth:`poll` between training steps and with :meth:`wait` at the end.

The coordinating task reserves no CPU when the pool has actors (it only waits on them); with
``runner.num_actors: 0`` it runs the model itself and reserves what one actor would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llmray import config as config_lib
from llmray import runs
from llmray.eval.stage import EvalConfig, evaluate_to, flat_metrics


def evaluate_into(cfg: EvalConfig, directory: str) -> dict[str, float]:
    """Evaluate the config's one checkpoint into ``directory`` (swapped in on success); flat metrics."""
    with runs.atomic_dir(Path(directory)) as partial:
        results = evaluate_to(cfg, partial)
    (entry,) = results["checkpoints"].values()
    return flat_metrics(entry)


class BackgroundEvaluator:
    """Evaluates checkpoints as Ray tasks while the caller carries on."""

    def __init__(self, cfg: EvalConfig, output_root: str | Path, chat: bool = False):
        self.cfg = cfg
        self.output_root = Path(output_root)
        self.chat = chat
        self._pending: dict = {}  # ObjectRef -> checkpoint name

    @classmethod
    def from_file(cls, path: str | Path, output_root: str | Path, overrides: list[str] | None = None,
                  chat: bool = False) -> "BackgroundEvaluator":
        return cls(config_lib.load(EvalConfig, path, overrides), output_root, chat)

    def submit(self, name: str, model_dir: str | Path) -> None:
        """Start evaluating ``model_dir`` into ``<output_root>/<name>``; returns immediately."""
        import ray

        cfg = dataclasses.replace(self.cfg, checkpoints={name: str(model_dir)},
                                  chat_models=[name] if self.chat else [])
        runner = cfg.runner
        in_task = runner.num_actors == 0
        task = ray.remote(evaluate_into).options(
            num_cpus=runner.num_cpus_per_actor if in_task else 0,
            num_gpus=runner.num_gpus_per_actor if in_task else 0)
        self._pending[task.remote(cfg, str(self.output_root / name))] = name

    @property
    def pending(self) -> list[str]:
        return list(self._pending.values())

    def poll(self) -> dict[str, dict[str, float]]:
        """Metrics of the evaluations that finished since the last call (raises if one failed)."""
        return self._collect(timeout=0)

    def wait(self) -> dict[str, dict[str, float]]:
        """Block until every submitted evaluation has finished; their metrics."""
        return self._collect(timeout=None)

    def _collect(self, timeout: float | None) -> dict[str, dict[str, float]]:
        import ray

        if not self._pending:
            return {}
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=timeout)
        return {self._pending.pop(ref): ray.get(ref) for ref in ready}

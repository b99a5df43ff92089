"""Run a training-worker function on Ray Train workers (TorchTrainer) and return rank 0's result.

Ray Train starts the workers and their torch process group (gloo on CPU, NCCL on GPU); the
function itself is unaware of Ray (it uses whatever process group exists). Rank 0's return
value comes back to the driver as the run's ``Result.return_value``.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable


def _loop(config: dict) -> Any:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(config["threads"])
    return config["fn"](config["spec"])


def run(fn: Callable[[Any], dict], spec: Any, *, workers: int, use_gpu: bool, cpus_per_worker: float,
        storage_path: str | None = None, name: str = "align") -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _loop,
        train_loop_config={"fn": fn, "spec": spec, "threads": max(1, int(cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path or tempfile.mkdtemp(prefix="llmray-align-")))
    return trainer.fit().return_value

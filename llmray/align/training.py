"""What SFT and DPO share: their config fields, and the per-worker function that runs the one Trainer.

Both stages prepare their rows on the driver (rendering/packing or pair encoding, plus DPO's
reference pass), then hand a :class:`WorkerSpec` to every training worker. A worker:

1. loads the initial weights from a Hugging Face-layout directory (:func:`llmray.model.hf.load`);
2. builds its :class:`~llmray.align.loader.RowLoader` for its data-parallel rank;
3. runs :class:`llmray.train.trainer.Trainer` — the same loop as pretraining — with the stage's
   objective (:class:`~llmray.train.objectives.MaskedLM` or :class:`~llmray.train.objectives.DPO`),
   the parallel layout of ``parallel`` (FSDP2 / DeepSpeed / one process) and the stage's hooks;
4. exports the final full weights in HF layout (rank 0), with the tokenizer beside them, so the
   next stage (DPO after SFT, eval, chat) loads them like any model.

``train_worker`` uses whatever process group exists (none: one process; Ray Train or torchrun
workers: data parallel), so the single-process path and the distributed path are the same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from llmray import runs
from llmray.align.loader import RowLoader
from llmray.config import config_hash, param
from llmray.parallel import ParallelConfig
from llmray.train.trainer import TrainConfig

log = logging.getLogger("llmray.align")


@dataclass
class SamplingSection:
    """Chat completions sampled on held-out prompts after training (written to the run and report)."""

    prompts: int = param(16, doc="held-out prompts to complete (0 = none)", min=0)
    max_new_tokens: int = param(128, doc="most tokens per completion", min=1)
    temperature: float = param(0.7, doc="sampling temperature (0 = greedy)", min=0.0)
    top_p: float = param(0.9, doc="nucleus sampling mass", min=0.0, max=1.0)
    seed: int = param(0, doc="sampling seed")


@dataclass
class AlignConfig:
    """Fields SFT and DPO share."""

    model: str = param("{run_dir}/pretrain/output/model",
                       doc="initial weights: a Hugging Face-layout directory (config.json + model.safetensors)")
    tokenizer: str = param("{run_dir}/tokenizer/output", doc="directory holding tokenizer.json")
    seq_len: int = param(512, doc="tokens per training row (a packed SFT row, or one DPO sequence)", min=8)
    batch_size: int = param(8, doc="rows (SFT) or pairs (DPO) per micro-batch on each worker", min=1)
    val_fraction: float = param(0.05, doc="share of record groups held out for validation and samples",
                                min=0.0, max=0.5)
    seed: int = param(0, doc="seed of the split, the mixture sampling and the row order", min=0)
    workers: int = param(1, doc="data-parallel training workers (Ray Train when > 1)", min=1)
    use_gpu: bool = param(False, doc="one GPU per worker")
    cpus_per_worker: float = param(1.0, doc="logical CPUs each training worker reserves", min=0.01)
    train: TrainConfig = param(default_factory=TrainConfig, doc="the training loop (steps, optimizer, schedule)")
    parallel: ParallelConfig = param(default_factory=ParallelConfig, doc="how the model is spread over workers")
    samples: SamplingSection = param(default_factory=SamplingSection, doc="completions sampled after training")

    def base_inputs(self) -> dict[str, str]:
        return {"model": self.model, "tokenizer": self.tokenizer}


@dataclass
class WorkerSpec:
    """Everything a training worker needs (pickled to each worker)."""

    init_dir: str
    tokenizer_dir: str
    output_dir: str  # rank 0 exports the final weights here
    train: TrainConfig
    parallel: ParallelConfig
    objective: Any
    train_rows: Any  # PackedRows or PairRows
    train_sha256: str
    batch_size: int
    seed: int
    val_rows: Any = None
    val_sha256: str = ""
    metrics_path: str | None = None
    checkpoint_dir: str | None = None
    hook_factories: list[Callable[["WorkerSpec", Any], Callable[[int, dict], None]]] = dc_field(default_factory=list)


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def checkpoint_location(work: Path, cfg: Any, init_dir: str | Path, train_sha256: str) -> str:
    """Where a run checkpoints, keyed by all that decides its result: the stage config, the initial
    weights and the training rows. An interrupted identical run resumes; a new base model or setting
    starts afresh instead of resuming a checkpoint trained from something else."""
    key = json.dumps({"config": config_hash(cfg), "init": runs.fingerprint(init_dir), "train": train_sha256})
    return str(Path(work) / "checkpoints" / hashlib.sha256(key.encode()).hexdigest()[:16])


def train_worker(spec: WorkerSpec) -> dict:
    """Train on this worker's share of the rows; returns the losses, evaluations and hook results."""
    from llmray.model import hf
    from llmray.train.checkpoint import LocalCheckpointStore
    from llmray.train.metrics import MetricsWriter
    from llmray.train.trainer import Trainer, device_for_worker

    rank, world = rank_and_world()
    shard, shards = spec.parallel.data_shard(rank, world)
    pretrained = hf.load(spec.init_dir, device=device_for_worker())
    model = pretrained.model.train()
    torch.manual_seed(spec.train.seed)
    data = RowLoader(spec.train_rows, batch_size=spec.batch_size, rank=shard, world_size=shards,
                     data_sha256=spec.train_sha256, seed=spec.seed)
    val = None
    if spec.val_rows is not None:
        def val():
            return RowLoader(spec.val_rows, batch_size=spec.batch_size, rank=shard, world_size=shards,
                             data_sha256=spec.val_sha256, shuffle=False, epochs=1)
    writer = None
    if rank == 0 and spec.metrics_path:
        path = Path(spec.metrics_path)
        writer = MetricsWriter(path, path.parent / "tensorboard", console_every=spec.train.log_every)
    store = LocalCheckpointStore(Path(spec.checkpoint_dir), num_to_keep=2) if spec.checkpoint_dir else None
    trainer = Trainer(spec.train, model, spec.objective, data, parallel=spec.parallel, store=store, val_data=val,
                      flops_per_token=pretrained.config.flops_per_token(spec.train_rows.tokens.shape[1] - 1),
                      writer=writer)
    hooks = [factory(spec, trainer) for factory in spec.hook_factories]
    trainer.hooks.extend(hooks)
    for hook in hooks:  # a baseline before the first step (the initial model)
        hook(0, {})
    result = trainer.fit()
    state = trainer.export_weights()
    if rank == 0:
        hf.export(spec.output_dir, pretrained.config, state, tokenizer_dir=spec.tokenizer_dir)
    if writer is not None:
        writer.close()
    return {"losses": result.losses, "evals": result.evals, "guard_counts": result.guard_counts,
            "hooks": [getattr(hook, "history", None) for hook in hooks]}


def run_workers(spec: WorkerSpec, cfg: AlignConfig) -> dict:
    """Run :func:`train_worker` in this process (1 worker) or on Ray Train workers; rank 0's result."""
    if cfg.workers == 1 and not cfg.use_gpu:
        return train_worker(spec)
    from llmray.train import ray_train

    ray_cfg = ray_train.RayTrainConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                       cpus_per_worker=cfg.cpus_per_worker)
    # Ray Train's run state sits beside the worker checkpoints, in the stage's work directory.
    storage = Path(spec.checkpoint_dir).parent if spec.checkpoint_dir else Path(tempfile.mkdtemp(prefix="llmray-"))
    run = ray_train.fit(_ray_train_worker, {"spec": spec, "ray": ray_cfg}, ray_cfg,
                        name=f"align-{spec.train_sha256[:16]}", storage_path=storage)
    return run.value


def _ray_train_worker(config: dict) -> dict:
    from llmray.train import ray_train

    ray_train.worker_setup(config["ray"])
    return train_worker(config["spec"])

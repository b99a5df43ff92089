"""The one way a training stage runs: model + objective + data + ``Trainer``, in process or on Ray Train.

Design choices:

* A stage describes its run as a picklable :class:`TrainJob` (how to build the model, the
  objective, per-shard data recipes, the loop / parallel / execution settings, where
  checkpoints, metrics and the export go); :func:`launch` runs it. Every worker executes
  :func:`train_worker`, so the in-process path and the Ray Train path are the same code, and
  pretraining, SFT, DPO and the tune proxy differ only in their objective and data.
* ``execution.launcher: auto`` trains in this process when there is one worker and no GPU is
  asked for (no worker group to start: proxy trials, a laptop), else on Ray Train (worker
  restarts from the latest checkpoint, multi-node).
* Checkpoints are one directory of ``step_*`` folders under either launcher (a local store, an
  object store, or Ray Train's run directory ``storage_path/name``, any of them a URI); either
  launcher resumes from the newest complete one there, and rank 0 reads the exported weights
  back from it, once every rank's part is stored, and writes them to ``export_dir`` itself (DCP
  reshards on load, so the export does not depend on the layout that trained; the driver never
  handles the weights). A chat model's export (``chat``)
  names end-of-turn as well as end-of-sequence as its ``eos_token_id``, so ``generate`` in
  ``transformers`` stops at the end of the reply.
* Observability, the same under either launcher: every worker sets its live gauges
  (:func:`llmray.dashboard_metrics.publish_worker`) at each logged step when the job has
  ``tags``; rank 0 writes ``metrics.jsonl`` and one console line per logged step; an
  ``evaluation`` section scores checkpoints while training (:mod:`llmray.train.periodic_eval`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
import torch.distributed as dist

from llmray import storage
from llmray.config import param
from llmray.model.config import ModelConfig
from llmray.parallel import ParallelConfig
from llmray.tokenizer import TOKENIZER_FILE
from llmray.train import periodic_eval
from llmray.train.objectives import Objective
from llmray.train.periodic_eval import PeriodicEval, TrainingEvalConfig
from llmray.train.ray_train import TrainingFailed
from llmray.train.trainer import TrainConfig

log = logging.getLogger("llmray.train")

Launcher = Literal["auto", "process", "ray_train"]
LAUNCHER_DOC = ("process: train in this process (one worker); ray_train: a Ray Train worker group (restarts "
                "from the latest checkpoint after failures, multi-node); auto: process when workers is 1 and "
                "use_gpu is not true, else ray_train")


@dataclass
class ExecutionConfig:
    """Where the training workers run and what each one gets (a stage's subclass may change defaults)."""

    launcher: Launcher = param("auto", doc=LAUNCHER_DOC)
    workers: int = param(1, doc="training workers, one process each (the parallel degrees multiply to this)",
                         min=1)
    use_gpu: bool | None = param(None, doc="one GPU per worker; null = when the Ray cluster (in process: this "
                                           "machine) has GPUs; false = CPU even where a GPU is visible")
    cpus_per_worker: float = param(1.0, doc="CPUs Ray reserves per worker (fractions allowed)", min=0.01)
    threads_per_worker: int | None = param(None, doc="torch threads per worker; null = cpus_per_worker rounded "
                                                     "down (at least 1) on Ray Train, torch's default in process",
                                           min=1)
    resources_per_worker: dict[str, float] = param(default_factory=dict, doc="extra custom Ray resources per worker")
    max_failures: int = param(2, doc="ray_train: worker-group restarts from the latest checkpoint before the "
                                     "run fails", min=0)
    num_to_keep: int = param(2, doc="checkpoints kept (older ones are deleted)", min=1)
    storage_path: str | None = param(None, doc="where checkpoint folders go (shared storage on a multi-node "
                                               "cluster); null = the stage's work/checkpoints")
    name: str | None = param(None, doc="pretraining with storage_path: its checkpoint folder there (reusing it "
                                       "resumes); null = <run>-<stage>. SFT/DPO key theirs by config, weights "
                                       "and data")

    def __post_init__(self) -> None:
        if self.launcher == "process" and self.workers > 1:
            raise ValueError(f"launcher=process trains in this one process, but workers={self.workers}; "
                             f"set workers: 1 or launcher: ray_train")

    @property
    def in_process(self) -> bool:
        if self.launcher == "auto":
            return self.workers == 1 and self.use_gpu is not True
        return self.launcher == "process"

    def checkpoint_root(self, work: str | Path) -> str:
        """Where a stage's checkpoint folders go (a local path or a URI): ``storage_path``, else the
        stage's ``work/checkpoints``."""
        return storage.normalize(self.storage_path) if self.storage_path else storage.join(work, "checkpoints")

    @property
    def worker_threads(self) -> int:
        """torch threads of a Ray Train worker."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


@dataclass
class BatchConfig:
    """The shape and order of micro-batches, per worker."""

    seq_len: int = param(256, doc="tokens per training row (pretraining window T, a packed SFT row, one DPO "
                                   "sequence)", min=1)
    micro_batch_size: int = param(8, doc="rows (DPO: pairs) per micro-batch on each data-parallel worker", min=1)
    seed: int | None = param(None, doc="seed of the row order; null = train.seed", min=0)

    def order_seed(self, train: TrainConfig) -> int:
        return train.seed if self.seed is None else self.seed


@dataclass
class FreshModel:
    """A model initialized from ``train.seed`` (pretraining)."""

    config: ModelConfig

    def build(self, seed: int) -> tuple[torch.nn.Module, ModelConfig, Any]:
        """On ``meta``, with its :data:`~llmray.model.param_init.Source`: the Trainer shards the
        model, then fills each rank's part from that source (here, the seeded initialization)."""
        from llmray.model import llama, param_init

        model = llama.build(self.config, "meta")
        return model, self.config, param_init.seeded(seed, model.init_rule)


@dataclass
class PretrainedModel:
    """A model loaded from a Hugging Face-layout directory (SFT, DPO, RL)."""

    directory: str

    @property
    def config(self) -> ModelConfig:
        from llmray.model import hf

        return hf.read_config(self.directory)

    def build(self, seed: int) -> tuple[torch.nn.Module, ModelConfig, Any]:
        """On ``meta``, filled from the weights file (:class:`~llmray.model.hf.WeightSlices`): FSDP2, TP
        and PP ranks read only their part of it, ZeRO-3 ranks one module at a time."""
        from llmray.model import hf, llama

        directory = storage.local_copy(self.directory)
        config = hf.read_config(directory)
        return llama.build(config, "meta"), config, hf.WeightSlices(directory, config)


# A data recipe: (data-parallel shard, shard count) -> micro-batch iterator (training) or iterable
# (validation; called again for every validation pass). Raises ValueError when the split is too
# small for one batch per worker.
DataRecipe = Callable[[int, int], Any]
# A hook factory: trainer -> hook(step, metrics), run on every rank at step 0 and after each step;
# a hook's ``history`` list, when it keeps one, comes back in rank 0's report.
HookFactory = Callable[[Any], Callable[[int, dict], None]]


@dataclass
class TrainJob:
    """Everything a training worker needs (pickled to each worker)."""

    model: FreshModel | PretrainedModel
    objective: Objective
    train_data: DataRecipe
    train: TrainConfig
    parallel: ParallelConfig
    execution: ExecutionConfig
    seq_len: int
    checkpoint_dir: str  # step_* checkpoints go here under either launcher
    val_data: DataRecipe | None = None
    export_dir: str | None = None  # final weights in Hugging Face layout
    tokenizer_dir: str | None = None  # copied beside the export
    bits_per_byte: bool = False  # validation bits per byte (needs tokenizer_dir)
    metrics_path: str | None = None  # rank 0 writes metrics.jsonl here, TensorBoard files beside it
    resume_from: str | None = None  # a checkpoint to start from when checkpoint_dir has none
    hooks: list[HookFactory] = field(default_factory=list)
    chat: bool = False  # a chat model (SFT, DPO): its export stops generation at end of turn
    tags: dict[str, str] = field(default_factory=dict)  # {"run", "stage"} of the live gauges; empty = none
    evaluation: TrainingEvalConfig | None = None  # in-training evaluation of checkpoints
    evaluation_dir: str | None = None  # its results (step_N/) and the weights being scored (weights/)
    # memory_plan.plan with the shapes bound: (compute_bytes=, gpu=) -> per-rank plans, checked by
    # each worker against its device before anything is allocated; None = no check
    memory_plan: Callable[..., list] | None = None


@dataclass
class LaunchResult:
    checkpoint: str  # the last complete checkpoint (a local path or a URI)
    model_config: ModelConfig
    worker: dict  # rank 0's report: losses, evals, guard counts, hook histories, last metrics
    evaluations: list[dict] = field(default_factory=list)  # in-training evaluation records, as finished


def launch(job: TrainJob, connect_ray: Callable[[], Any]) -> LaunchResult:
    """Run ``job`` in this process or on Ray Train (``connect_ray`` is called only for the latter, or for
    in-training evaluation); rank 0 exports the last complete checkpoint when ``job.export_dir`` is set."""
    checkpoints = storage.normalize(job.checkpoint_dir)
    if job.evaluation is not None and storage.is_remote(checkpoints):
        raise ValueError(f"in-training evaluation reads checkpoints from a filesystem every worker mounts; "
                         f"checkpoints go to {checkpoints}: evaluate the exported model with `llmray eval` "
                         f"instead, or set execution.storage_path to a shared filesystem")
    coordinator = None
    if job.evaluation is not None:
        connect_ray()
        coordinator = periodic_eval.start_coordinator(job.evaluation, Path(job.evaluation_dir), job.chat)
    try:
        report = _train(job, checkpoints, coordinator, connect_ray)
        evaluations = periodic_eval.finish(coordinator, job.metrics_path) if coordinator is not None else []
    finally:
        if coordinator is not None:
            periodic_eval.stop(coordinator)
    return LaunchResult(report["checkpoint"], job.model.config, report, evaluations)


def _train(job: TrainJob, checkpoints: str, coordinator: Any, connect_ray: Callable[[], Any]) -> dict:
    from llmray.train import checkpoint as ckpt

    if job.execution.in_process:
        store_type = ckpt.ObjectStoreCheckpointStore if storage.is_remote(checkpoints) else ckpt.LocalCheckpointStore
        store = store_type(checkpoints, num_to_keep=job.execution.num_to_keep, log=log.warning)
        with _torch_threads(job.execution.threads_per_worker):
            return train_worker(job, store, coordinator)
    from llmray.train import ray_train

    connect_ray()
    return ray_train.fit(_ray_train_entry, {"job": job, "coordinator": coordinator}, job.execution,
                         name=storage.name(checkpoints), storage_path=storage.parent(checkpoints))


def export_checkpoint(checkpoint: Path, model_config: ModelConfig, out_dir: str | Path,
                      tokenizer_dir: str | None, chat: bool = False) -> None:
    """Full fp32 weights of ``checkpoint`` in Hugging Face layout, with the tokenizer files beside them
    (``chat``: generation stops at end of turn too)."""
    from llmray.model import hf, llama
    from llmray.train import checkpoint as ckpt

    model = llama.build(model_config, "cpu", init=False)
    ckpt.load_model_weights(checkpoint, model)
    hf.export(out_dir, model_config, model.state_dict(), tokenizer_dir=tokenizer_dir, chat=chat)


def train_worker(job: TrainJob, store, coordinator: Any = None, ray_train_worker: bool = False) -> dict:
    """Build and run the Trainer on this worker's share of the data; rank 0's return value is the report,
    and rank 0 exports the final weights (``job.export_dir``) straight to the run's storage.

    ``coordinator``: the in-training evaluation actor (:mod:`llmray.train.periodic_eval`), when on.
    ``ray_train_worker``: called by Ray Train, whose assigned device the worker uses."""
    from llmray.train.metrics import MetricsWriter
    from llmray.train.trainer import Trainer, device_for_worker

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard, shards = job.parallel.data_shard(rank, world)
    device = torch.device("cpu") if job.execution.use_gpu is False else device_for_worker(ray_train_worker)
    if job.memory_plan is not None:
        _check_memory(job, device)
    torch.manual_seed(job.train.seed)
    model, model_config, initial_values = job.model.build(job.train.seed)
    writer = None
    if rank == 0 and job.metrics_path:
        writer = MetricsWriter(job.metrics_path, storage.join(storage.parent(job.metrics_path), "tensorboard"),
                               console_every=job.train.log_every)
    token_bytes = token_byte_lengths(storage.local_copy(job.tokenizer_dir), model_config.vocab_size) \
        if job.bits_per_byte and job.tokenizer_dir else None
    trainer = Trainer(job.train, model, job.objective, job.train_data(shard, shards), parallel=job.parallel,
                      store=store, val_data=_validation(job.val_data, shard, shards, rank),
                      token_bytes=token_bytes, flops_per_token=model_config.flops_per_token(job.seq_len),
                      writer=writer, device=device, init=initial_values)
    del initial_values  # every part is filled: a weights file's memory maps close with it
    if job.tags:  # before the job's hooks, which may read the gauges of the step
        trainer.hooks.append(WorkerGauges(job.tags["run"], job.tags["stage"], rank, job.train.log_every))
    if coordinator is not None:
        export = functools.partial(export_checkpoint, model_config=model_config, tokenizer_dir=job.tokenizer_dir,
                                   chat=job.chat)
        trainer.hooks.append(PeriodicEval(trainer, coordinator, job.evaluation, Path(job.checkpoint_dir).resolve(),
                                          Path(job.evaluation_dir) / "weights", export))
    hooks = [factory(trainer) for factory in job.hooks]
    trainer.hooks.extend(hooks)
    for hook in hooks:  # a baseline of the initial model
        hook(0, {})
    try:
        result = trainer.fit(resume_from=job.resume_from)
    finally:
        if writer is not None:
            writer.close()
        if hasattr(trainer.data, "close"):  # data that holds workers (RL rollout actors) releases them
            trainer.data.close()
    if dist.is_initialized():  # every rank's part of the last checkpoint is stored (its report returned)
        dist.barrier()
    if rank:
        return {}
    latest = store.latest()
    if latest is None:
        raise TrainingFailed(f"training finished without a complete checkpoint in {job.checkpoint_dir}")
    if job.export_dir:
        export_checkpoint(latest, model_config, job.export_dir, job.tokenizer_dir, chat=job.chat)
    return {"steps": trainer.step, "losses": result.losses, "evals": result.evals,
            "checkpoint": storage.join(job.checkpoint_dir, latest.name),
            "guard_counts": result.guard_counts, "metrics": result.last_metrics,
            "hooks": [getattr(hook, "history", None) for hook in hooks]}


class WorkerGauges:
    """Hook: this worker's figures of every logged step on the Ray dashboard / Prometheus endpoint."""

    def __init__(self, run: str, stage: str, rank: int, log_every: int):
        self.run, self.stage, self.rank, self.log_every = run, stage, rank, log_every

    def __call__(self, step: int, metrics: dict) -> None:
        from llmray import dashboard_metrics

        if step and (step % self.log_every == 0 or "val_loss" in metrics):
            dashboard_metrics.publish_worker(self.run, self.stage, self.rank, step, metrics)


def _validation(recipe: DataRecipe | None, shard: int, shards: int, rank: int) -> Callable[[], Iterable] | None:
    if recipe is None:
        return None
    try:
        recipe(shard, shards)
    except ValueError as exc:  # no validation split, or too small for one batch per worker
        if rank == 0:
            log.warning("no validation: %s", exc)
        return None
    return functools.partial(recipe, shard, shards)


def _check_memory(job: TrainJob, device: torch.device) -> None:
    """Refuse a layout whose planned per-rank memory exceeds this worker's device (before allocating)."""
    from llmray.train import memory_plan, precision

    shape = job.model.config
    dtype = precision.compute_dtype(job.train.precision, device, shape.dim, shape.ffn_hidden_dim)
    plans = job.memory_plan(compute_bytes=2 if dtype is torch.bfloat16 else 4, gpu=device.type == "cuda")
    memory_plan.check_fits(plans, memory_plan.device_memory(device), f"on {device}")


def _ray_train_entry(config: dict) -> dict:
    from llmray.train import ray_train

    job: TrainJob = config["job"]
    ray_train.quiet_worker_logging()
    torch.set_num_threads(job.execution.worker_threads)
    return train_worker(job, ray_train.RayCheckpointStore(job.checkpoint_dir, log.warning),
                        config["coordinator"], ray_train_worker=True)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def token_byte_lengths(directory: Path, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes of each token id (special tokens 0), for bits per byte.

    Byte-level BPE spells every byte as one character of its alphabet, so a token's length in
    bytes is its string length; other tokenizers are measured by decoding each id.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    byte_level = (json.loads(tokenizer.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if index < vocab_size and token not in special:
            lengths[index] = len(token) if byte_level else len(tokenizer.decode([index]).encode("utf-8"))
    return lengths

"""``llmray pretrain`` (and ``llmray proxy train``): the causal-LM objective on token shards.

Inputs: the output directory of ``llmray tokens`` (``data.tokens``; its manifest names the
tokenizer, used for bits per byte and copied beside the export), optionally a checkpoint to
start from (``resume_from``). Outputs under the stage's ``output/``: ``model/`` (Hugging Face
Llama layout) and ``training.json`` (steps, final metrics, the last checkpoint).

Checkpoints go to ``execution.storage_path/<name>`` or the stage's ``work/checkpoints``; running
the stage again resumes from the newest complete one. The ``proxy`` stage is this stage with
in-process defaults sized for sweeps and data ablations (:class:`ProxyConfig`).

An ``eval`` section scores checkpoints on benchmark tasks while training
(:mod:`llmray.train.periodic_eval`; results in ``metrics.jsonl`` and the stage's ``evals/``), and
every worker's figures are live on the Ray dashboard (``llmray_worker_*``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from llmray import runs, storage
from llmray.config import param
from llmray.model import hf
from llmray.model.config import ModelConfig, preset
from llmray.parallel import ParallelConfig
from llmray.train import memory_plan
from llmray.train.launch import LAUNCHER_DOC, BatchConfig, ExecutionConfig, FreshModel, Launcher, TrainJob, launch
from llmray.train.periodic_eval import TrainingEvalConfig
from llmray.train.trainer import TrainConfig

log = logging.getLogger("llmray.pretrain")


@dataclass
class TokensInput:
    """Which token shards to train on."""

    tokens: str = param("{run_dir}/tokens/output", doc="output directory of `llmray tokens`")
    verify: bool = param(True, doc="check every shard's sha256 against the manifest at start")


@dataclass
class PretrainExecution(ExecutionConfig):
    """Pretraining runs on Ray Train workers unless told otherwise (restarts after worker failures)."""

    launcher: Launcher = param("ray_train", doc=LAUNCHER_DOC)


@dataclass
class ProxyExecution(ExecutionConfig):
    """A proxy trial trains in its own process with one torch thread."""

    launcher: Launcher = param("process", doc=LAUNCHER_DOC)
    threads_per_worker: int | None = param(1, doc="torch threads (null: torch's default)", min=1)


@dataclass
class ProxyBatch(BatchConfig):
    seq_len: int = param(128, doc="tokens per training window", min=1)


@dataclass
class PretrainTrainConfig(TrainConfig):
    """The training loop of pretraining: its length may come from a token budget instead of ``steps``."""

    tokens_per_param: float | None = param(
        None, doc="token budget per model parameter (Chinchilla's compute-optimal ratio is ~20): steps = "
                  "ceil(tokens_per_param × parameters / tokens per optimizer step), replacing steps; "
                  "null = train for steps", min=0.0)
    z_loss: float = param(0.0, doc="coefficient of PaLM's z-loss (z_loss·logsumexp(logits)² per token, a "
                                   "stability aid for long bf16 runs; counted in the logged train loss, not "
                                   "in validation); 0 = off", min=0.0)

    def budget_steps(self, parameters: int, tokens_per_step: int) -> int:
        """Steps of the run: ``steps``, or those the token budget buys (at least one)."""
        if self.tokens_per_param is None:
            return self.steps
        return max(1, math.ceil(self.tokens_per_param * parameters / tokens_per_step))


@dataclass
class PretrainConfig:
    """``llmray pretrain``: model shape, data, batches, loop, parallelism and execution."""

    model: ModelConfig = param(default_factory=lambda: preset("tiny"), doc="model shape (see configs/model)")
    data: TokensInput = param(default_factory=TokensInput, doc="token shards")
    batch: BatchConfig = param(default_factory=BatchConfig, doc="micro-batch shape and order")
    train: PretrainTrainConfig = param(default_factory=PretrainTrainConfig, doc="the training loop")
    parallel: ParallelConfig = param(default_factory=ParallelConfig, doc="how the model is spread over workers")
    execution: PretrainExecution = param(default_factory=PretrainExecution, doc="where the workers run")
    tokenizer: str | None = param(None, doc="tokenizer directory; null = the one named in the token manifest")
    vocab_from_tokens: bool = param(False, doc="set model.vocab_size to the token shards' vocabulary (sweeps over "
                                               "tokenizer sizes need no model edits)")
    resume_from: str | None = param(None, doc="checkpoint to start from when the run has none of its own "
                                              "(weights, optimizer, step, data position; the lr is this config's)")
    eval: TrainingEvalConfig | None = param(None, doc="in-training evaluation: an `llmray eval` config "
                                                      "(include: ../eval/tiny.yaml) plus `every`; its runner's "
                                                      "resources are reserved beside the workers; null = off")

    def __post_init__(self) -> None:
        if not isinstance(self.train, PretrainTrainConfig):  # a plain TrainConfig given in code: no budget
            self.train = PretrainTrainConfig(**{f.name: getattr(self.train, f.name)
                                                for f in dataclasses.fields(TrainConfig)})
        if self.eval is not None:
            self.eval.check_schedule(self.train.checkpoint_every)
        if self.batch.seq_len > self.model.max_seq_len:
            raise ValueError(f"batch.seq_len ({self.batch.seq_len}) exceeds model.max_seq_len "
                             f"({self.model.max_seq_len})")
        microbatches = self.parallel.pipeline.microbatches
        if self.parallel.pp > 1 and self.batch.micro_batch_size % microbatches:
            raise ValueError(f"batch.micro_batch_size ({self.batch.micro_batch_size}) must be divisible by "
                             f"parallel.pipeline.microbatches ({microbatches}): the schedule cuts each "
                             f"micro-batch into that many pipeline micro-batches")
        self.parallel.dims(self.execution.workers)  # degrees must multiply to the worker count

    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all data-parallel workers."""
        return self.batch.micro_batch_size * self.batch.seq_len * self.train.grad_accum * \
            self.parallel.dims(self.execution.workers).dp

    def inputs(self) -> dict[str, str]:
        inputs = {"tokens": self.data.tokens}
        if self.tokenizer:
            inputs["tokenizer"] = self.tokenizer
        if self.resume_from:
            inputs["resume_from"] = self.resume_from
        return inputs


@dataclass
class ProxyConfig(PretrainConfig):
    """``llmray proxy train``: pretraining of a small proxy model in this process (sweeps, ablations)."""

    batch: ProxyBatch = param(default_factory=ProxyBatch, doc="micro-batch shape and order")
    train: PretrainTrainConfig = param(default_factory=lambda: PretrainTrainConfig(steps=100, log_every=10),
                                       doc="the training loop")
    execution: ProxyExecution = param(default_factory=ProxyExecution, doc="where the worker runs")
    vocab_from_tokens: bool = param(True, doc="set model.vocab_size to the token shards' vocabulary")


def tokenizer_dir(cfg: PretrainConfig, manifest: dict) -> str | None:
    """The tokenizer folder (a local path or a URI): configured, else the token manifest's."""
    if cfg.tokenizer:
        return storage.normalize(cfg.tokenizer)
    recorded = (manifest.get("tokenizer") or {}).get("path")
    return storage.parent(recorded) if recorded and storage.is_file(recorded) else None


def pretrain_job(cfg: PretrainConfig, checkpoint_dir: str | Path, metrics_path: str | Path | None,
                 export_dir: str | Path | None = None, hooks: tuple = (), tags: dict[str, str] | None = None,
                 evaluation_dir: str | Path | None = None) -> TrainJob:
    """The causal-LM training job of ``cfg``: token shards split by data-parallel shard.

    ``tags`` (``run``, ``stage``) turn on the workers' live gauges; ``evaluation_dir`` is where
    the ``eval`` section's results go (required when it is set)."""
    if cfg.eval is not None and evaluation_dir is None:
        raise ValueError("pretrain_job: the config has an eval section but no evaluation_dir was given")
    from llmray.tokens import shards as shards_lib
    from llmray.tokens.loader import TokenData
    from llmray.train.objectives import CausalLM

    manifest = shards_lib.read_manifest(cfg.data.tokens)
    model = dataclasses.replace(cfg.model, vocab_size=int(manifest["vocab_size"])) if cfg.vocab_from_tokens \
        else cfg.model
    if manifest["vocab_size"] > model.vocab_size:
        raise ValueError(f"model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary "
                         f"({manifest['vocab_size']}) recorded in {cfg.data.tokens}/manifest.json")
    tokenizer = tokenizer_dir(cfg, manifest)
    steps = cfg.train.budget_steps(model.num_params(), cfg.tokens_per_step())
    if cfg.train.tokens_per_param is not None:
        log.info("token budget: %g tokens/parameter × %.2fM parameters = %.1fM tokens: %d steps of %d tokens",
                 cfg.train.tokens_per_param, model.num_params() / 1e6,
                 cfg.train.tokens_per_param * model.num_params() / 1e6, steps, cfg.tokens_per_step())
    b = cfg.batch
    train = TokenData(cfg.data.tokens, split="train", seq_len=b.seq_len, batch_size=b.micro_batch_size,
                      seed=b.order_seed(cfg.train), verify=cfg.data.verify)
    val = TokenData(cfg.data.tokens, split="val", seq_len=b.seq_len, batch_size=b.micro_batch_size,
                    shuffle=False, verify=cfg.data.verify)
    memory = functools.partial(memory_plan.plan, model, cfg.parallel, cfg.execution.workers, seq_len=b.seq_len,
                               micro_batch_size=b.micro_batch_size, optimizer=cfg.train.optimizer.kind,
                               muon_params=tuple(cfg.train.optimizer.muon.params), grad_accum=cfg.train.grad_accum)
    return TrainJob(model=FreshModel(model), objective=CausalLM(z_loss=cfg.train.z_loss), train_data=train,
                    val_data=val, memory_plan=memory,
                    train=dataclasses.replace(cfg.train, steps=steps), parallel=cfg.parallel,
                    execution=cfg.execution, seq_len=b.seq_len,
                    checkpoint_dir=str(checkpoint_dir), export_dir=str(export_dir) if export_dir else None,
                    tokenizer_dir=str(tokenizer) if tokenizer else None, bits_per_byte=tokenizer is not None,
                    metrics_path=str(metrics_path) if metrics_path else None, resume_from=cfg.resume_from,
                    hooks=list(hooks), tags=dict(tags or {}), evaluation=cfg.eval,
                    evaluation_dir=str(evaluation_dir) if evaluation_dir else None)


def checkpoint_dir(cfg: PretrainConfig, ctx) -> str:
    """The run's own folder under ``storage_path`` (shared by many runs), else the work directory's."""
    root = cfg.execution.checkpoint_root(ctx.dir.work)
    return storage.join(root, cfg.execution.name or f"{ctx.run_name}-{ctx.stage}") if cfg.execution.storage_path \
        else root


def run_pretrain(cfg: PretrainConfig, ctx, hooks: tuple = ()) -> dict:
    """Train, then export the final weights; ``hooks`` are hook factories (see :class:`TrainJob`)."""
    checkpoints = checkpoint_dir(cfg, ctx)
    export_dir = runs.at(ctx.output, "model")
    try:
        hf.check_exportable(cfg.model)
    except ValueError as exc:  # the GPT-2-style baseline: trained for comparison, kept as checkpoints
        ctx.logger.warning("no export: %s", exc)
        export_dir = None
    job = pretrain_job(cfg, checkpoints, ctx.dir.metrics_file, export_dir, hooks,
                       tags={"run": ctx.run_name, "stage": ctx.stage}, evaluation_dir=ctx.dir.at("evals"))
    ctx.logger.info("pretraining %.2fM parameters on %d worker(s) (%s), strategy %s; checkpoints in %s",
                    job.model.config.num_params() / 1e6, cfg.execution.workers,
                    "this process" if cfg.execution.in_process else "Ray Train", cfg.parallel.strategy, checkpoints)
    result = launch(job, ctx.connect_ray)
    steps, metrics = result.worker["steps"], result.worker["metrics"]
    summary = {"steps": steps, "params": result.model_config.num_params(),
               "tokens_seen": steps * cfg.tokens_per_step(),
               "checkpoint": result.checkpoint,
               **{k: metrics[k] for k in ("loss", "val_loss", "val_bpb", "tokens_per_s", "mfu") if k in metrics},
               "guard": result.worker["guard_counts"]}
    if result.evaluations:
        summary["eval"] = result.evaluations[-1]
    runs.write_json(runs.at(ctx.output, "training.json"), summary)
    return summary

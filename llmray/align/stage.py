"""What SFT and DPO share: their config fields and the stage skeleton around the one training launch.

A stage supplies only :class:`Prepared` (its rows, objective, hooks, held-out prompts and data
report); the skeleton loads the tokenizer and chat template, writes ``quarantine.jsonl`` and
``data.json``, trains with :func:`llmray.train.launch.launch` from the initial weights,
exports ``output/model`` with the tokenizer beside it (so the next stage, eval and chat load it
like any model; as a chat model, whose generation stops at end of turn) and samples replies to
held-out prompts. Checkpoints are keyed by everything that decides the result (stage config,
initial weights, training rows): an interrupted identical run resumes, a new base model or
setting starts afresh. The workers' figures are live on the Ray dashboard (``llmray_worker_*``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmray import runs, storage
from llmray.align.loader import RowData, RowSource
from llmray.align.records import Quarantined
from llmray.config import config_hash, param
from llmray.parallel import ParallelConfig
from llmray.train.launch import BatchConfig, ExecutionConfig, HookFactory, PretrainedModel, TrainJob
from llmray.train.trainer import TrainConfig


@dataclass
class SamplingSection:
    """Chat completions sampled on held-out prompts after training (written to the run and report)."""

    prompts: int = param(16, doc="held-out prompts to complete (0 = none)", min=0)
    max_new_tokens: int = param(128, doc="most tokens per completion", min=1)
    temperature: float = param(0.7, doc="sampling temperature (0 = greedy)", min=0.0)
    top_p: float = param(0.9, doc="nucleus sampling mass", min=0.0, max=1.0)
    seed: int = param(0, doc="sampling seed")


@dataclass
class AlignBatch(BatchConfig):
    seq_len: int = param(512, doc="tokens per training row (a packed SFT row, one DPO sequence)", min=1)


@dataclass
class AlignConfig:
    """Fields SFT and DPO share."""

    model: str = param("{run_dir}/pretrain/output/model",
                       doc="initial weights: a Hugging Face-layout directory (config.json + model.safetensors)")
    tokenizer: str = param("{run_dir}/tokenizer/output", doc="directory holding tokenizer.json")
    val_fraction: float = param(0.05, doc="share of record groups held out for validation and samples",
                                min=0.0, max=0.5)
    seed: int = param(0, doc="seed of the train/validation split and the mixture sampling", min=0)
    max_quarantine_fraction: float = param(0.5, doc="fail when more than this share of one source's records "
                                                    "is quarantined (a wrong format or a bug, not dirt)",
                                           min=0.0, max=1.0)
    batch: AlignBatch = param(default_factory=AlignBatch, doc="micro-batch shape and order")
    train: TrainConfig = param(default_factory=TrainConfig, doc="the training loop (steps, optimizer, schedule)")
    parallel: ParallelConfig = param(default_factory=ParallelConfig, doc="how the model is spread over workers")
    execution: ExecutionConfig = param(default_factory=ExecutionConfig, doc="where the workers run")
    samples: SamplingSection = param(default_factory=SamplingSection, doc="completions sampled after training")

    def base_inputs(self) -> dict[str, str]:
        return {"model": self.model, "tokenizer": self.tokenizer}


@dataclass
class Prepared:
    """A stage's data, ready to train on."""

    train_rows: RowSource
    val_rows: RowSource | None
    objective: Any
    data: dict  # written to data.json and the log
    quarantined: list[Quarantined]
    prompts: list[list[dict]]  # held-out prompts to sample replies to
    hooks: list[HookFactory] = field(default_factory=list)
    model: Any = None  # how the trained model is built (a launch model source); None = the LM at cfg.model


@dataclass
class Trained:
    prepared: Prepared
    worker: dict  # rank 0's report: losses, evals, hook histories, last metrics
    replies: list[dict]

    @property
    def losses(self) -> dict[int, float]:
        return self.worker["losses"]

    def loss_summary(self) -> dict:
        """Steps, first and final loss of the steps trained in this run (None after a resume at the end)."""
        losses = self.losses
        return {"steps": max(losses) if losses else 0, "first_loss": losses[min(losses)] if losses else None,
                "final_loss": losses[max(losses)] if losses else None}


def checkpoint_location(cfg: Any, work: str | Path, data_fingerprint: str) -> str:
    """Where a training stage (SFT, DPO, RL) checkpoints, keyed by its config (``model`` names the
    initial weights, ``execution`` the storage) and a fingerprint of its training data."""
    key = json.dumps({"config": config_hash(cfg), "init": runs.fingerprint(cfg.model), "train": data_fingerprint})
    return storage.join(cfg.execution.checkpoint_root(work), hashlib.sha256(key.encode()).hexdigest()[:16])


def alignment_job(cfg: AlignConfig, prepared: Prepared, checkpoint_dir: str | Path,
                  export_dir: str | Path | None, metrics_path: str | Path | None, tags: dict[str, str] | None = None) -> TrainJob:
    """The training job of an SFT/DPO stage: the rows split by data-parallel shard, from ``cfg.model``;
    a chat model (its export stops generation at end of turn)."""
    b = cfg.batch
    seed = b.order_seed(cfg.train)
    val = RowData(prepared.val_rows, b.micro_batch_size, shuffle=False, epochs=1) \
        if prepared.val_rows is not None else None
    return TrainJob(model=prepared.model or PretrainedModel(cfg.model), objective=prepared.objective,
                    train_data=RowData(prepared.train_rows, b.micro_batch_size, seed=seed), val_data=val,
                    train=cfg.train, parallel=cfg.parallel, execution=cfg.execution,
                    seq_len=prepared.train_rows.tokens.shape[1] - 1, checkpoint_dir=str(checkpoint_dir),
                    export_dir=str(export_dir) if export_dir else None, tokenizer_dir=cfg.tokenizer,
                    metrics_path=str(metrics_path) if metrics_path else None, hooks=prepared.hooks, chat=True,
                    tags=dict(tags or {}))


def run_alignment(cfg: AlignConfig, ctx, prepare: Callable[[Any, int], Prepared]) -> Trained:
    """Prepare the data with ``prepare(template, pad_id)``, train, export, and sample held-out replies."""
    from llmray.align import samples as samples_lib
    from llmray.tokenizer import chat, load_tokenizer
    from llmray.train.launch import launch

    tokenizer = load_tokenizer(cfg.tokenizer)
    prepared = prepare(chat.ChatTemplate(tokenizer), tokenizer.token_to_id(chat.PAD))
    runs.write_text(runs.at(ctx.output, "quarantine.jsonl"), "".join(json.dumps(q.to_dict()) + "\n" for q in prepared.quarantined))
    for q in prepared.quarantined[:5]:
        ctx.logger.warning("quarantined %s:%d (%s): %s", q.path, q.offset, q.error, q.message)
    runs.write_json(runs.at(ctx.output, "data.json"), prepared.data)
    ctx.logger.info("%s data: %s", ctx.stage, json.dumps(prepared.data))

    job = alignment_job(cfg, prepared, checkpoint_location(cfg, ctx.dir.work, prepared.train_rows.fingerprint),
                        runs.at(ctx.output, "model"), ctx.dir.metrics_file,
                        tags={"run": ctx.run_name, "stage": ctx.stage})
    result = launch(job, ctx.connect_ray)
    replies = []
    if cfg.samples.prompts and prepared.prompts:
        replies = samples_lib.sample_replies(runs.at(ctx.output, "model"), cfg.tokenizer, prepared.prompts, cfg.samples)
        samples_lib.write_samples(ctx.output, replies)
    return Trained(prepared, result.worker, replies)


def source_table(counts: dict) -> list[str]:
    """The report's per-source table of record counts."""
    return (["| source | read | train | val | quarantined |", "|---|---|---|---|---|"]
            + [f"| {name} | {c['read']} | {c['train']} | {c['val']} | {c['quarantined']} |"
               for name, c in counts.items()])

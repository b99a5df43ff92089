"""``llmray proxy train``: a short pretraining of a small model in this one process.

Sweeps and data ablations compare many settings with small *proxy* models; each trial is
seconds to minutes of training, so it runs the one training core (:class:`~llmray.train.trainer.Trainer`)
in the Tune trial's own process ("a function trainable for single-process trials") rather than
starting a Ray Train worker group per trial, which on a 2-core laptop would cost more than the
training. Everything else is the production path: token shards through the exact-resume
:class:`~llmray.tokens.loader.TokenLoader`, checkpoints through
:class:`~llmray.train.checkpoint.LocalCheckpointStore`, metrics into the stage's ``metrics.jsonl``
(which the trial reports to Tune as it grows), and the weights exported in Hugging Face layout
with the tokenizer beside them, so ``llmray eval`` scores the proxy like any checkpoint.

Resume: a stage re-run after an interruption continues from its newest complete checkpoint in
``work/checkpoints``. ``init_from`` starts from another run's checkpoint (what a PBT exploit
hands over): weights, optimizer moments, step and data position come from it, while the peak
learning rate and the schedule are this config's, so a mutated LR takes effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmray.config import param
from llmray.model.config import ModelConfig, preset
from llmray.train.trainer import TrainConfig

CHECKPOINTS = "checkpoints"  # under the stage's work directory


@dataclass
class ProxyConfig:
    """Train a small proxy model in one process on token shards and export it for evaluation."""

    tokens: str = param("{run_dir}/tokens/output", doc="token shard directory (train and val splits)")
    tokenizer: str | None = param("{run_dir}/tokenizer/output",
                                  doc="directory with tokenizer.json, copied beside the exported weights "
                                      "(null: export weights only)")
    model: ModelConfig = param(default_factory=lambda: preset("tiny"),
                               doc="model shape; vocab_size is taken from the token shards")
    seq_len: int = param(128, doc="tokens per training row", min=1)
    batch_size: int = param(8, doc="rows per optimizer step", min=1)
    train: TrainConfig = param(default_factory=lambda: TrainConfig(steps=100, log_every=10),
                               doc="training loop settings")
    threads: int | None = param(1, doc="torch CPU threads (null: torch's default)", min=1)
    keep_checkpoints: int = param(2, doc="newest complete checkpoints kept in work/checkpoints", min=1)
    init_from: str | None = param(None, doc="checkpoint directory to start from (weights, optimizer, step, "
                                            "data position); lr and schedule come from this config")

    def __post_init__(self) -> None:
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")

    def inputs(self) -> dict[str, str]:
        found = {"tokens": self.tokens}
        if self.tokenizer:
            found["tokenizer"] = self.tokenizer
        if self.init_from:
            found["init_from"] = self.init_from
        return found


def run_proxy(cfg: ProxyConfig, ctx) -> dict:
    import dataclasses

    import torch

    from llmray.model import hf, llama
    from llmray.tokens import shards as shards_lib
    from llmray.tokens.loader import TokenLoader
    from llmray.train import checkpoint as ckpt
    from llmray.train.metrics import MetricsWriter
    from llmray.train.objectives import CausalLM
    from llmray.train.trainer import Trainer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    manifest = shards_lib.read_manifest(Path(cfg.tokens))
    model_cfg = dataclasses.replace(cfg.model, vocab_size=int(manifest["vocab_size"]))
    torch.manual_seed(cfg.train.seed)
    model = llama.build(model_cfg)
    data = TokenLoader(cfg.tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.train.seed)

    def val_data():
        return TokenLoader(cfg.tokens, split="val", seq_len=cfg.seq_len, batch_size=cfg.batch_size, shuffle=False)

    store = ckpt.LocalCheckpointStore(ctx.dir.work / CHECKPOINTS, num_to_keep=cfg.keep_checkpoints,
                                      log=ctx.logger.warning)
    writer = MetricsWriter(ctx.dir.root / "metrics.jsonl", None, console_every=0)
    trainer = Trainer(cfg.train, model, CausalLM(), data, store=store, val_data=val_data, writer=writer)
    if cfg.init_from and store.latest() is None:
        ok, why = ckpt.is_complete(Path(cfg.init_from))
        if not ok:
            raise ValueError(f"init_from={cfg.init_from} is not a complete checkpoint: {why}")
        trainer.restore(Path(cfg.init_from))
        _use_configured_lr(trainer, cfg.train.optimizer.lr)
        ctx.logger.info("started from %s at step %d with lr %g", cfg.init_from, trainer.step, cfg.train.optimizer.lr)
    result = trainer.fit()
    writer.close()
    hf.export(ctx.output / "model", model_cfg, trainer.export_weights(), tokenizer_dir=cfg.tokenizer)
    last = result.records[-1] if result.records else None
    summary = {"steps": result.steps, "params": model_cfg.num_params(),
               "tokens_seen": result.steps * cfg.batch_size * cfg.seq_len}
    if last is not None:
        summary["loss"] = last.loss
    if result.evals:
        summary.update({k: v for k, v in result.evals[-1].items() if k != "step"})
    return summary


def _use_configured_lr(trainer, lr: float) -> None:
    """After loading another run's checkpoint, put this config's peak lr under the restored schedule."""
    for scheduler in trainer.schedulers:
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in scheduler.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * factor
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

"""The ``llmray pretrain`` stage: the training core with the causal-LM objective on token shards, on Ray Train.

Inputs: the output directory of ``llmray tokens`` (``data.tokens``; its manifest names the
tokenizer, used for bits-per-byte and copied into the export), optionally a checkpoint to
start from (``resume_from``). Outputs under the stage's ``output/``:

* ``model/``: final weights in Hugging Face Llama layout (``model.safetensors``, ``config.json``,
  tokenizer files), exported in the driver from the last complete checkpoint (DCP reshards on
  load, so the export does not depend on how many workers trained);
* ``training.json``: steps, final metrics, and the path of the last checkpoint.

Checkpoints live in the Ray Train run ``<run>-pretrain`` under ``work/ray`` (or
``ray.storage_path``); running the stage again with the same run name resumes from the newest
complete checkpoint. ``metrics.jsonl`` and TensorBoard files go to the stage directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmray import runs
from llmray.config import param
from llmray.model.config import ModelConfig, preset
from llmray.parallel import ParallelConfig
from llmray.train.ray_train import RayTrainConfig
from llmray.train.trainer import TrainConfig

log = logging.getLogger("llmray.pretrain")


@dataclass
class DataConfig:
    """Which token shards, cut into which batches."""

    tokens: str = param("{run_dir}/tokens/output", doc="output directory of `llmray tokens`")
    seq_len: int = param(256, doc="tokens per training sequence (T; rows are T+1 long)", min=1)
    micro_batch_size: int = param(8, doc="sequences per micro-batch on each worker", min=1)
    seed: int = param(0, doc="seed of the sequence shuffle", min=0)
    verify: bool = param(True, doc="check every shard's sha256 against the manifest at start")


@dataclass
class PretrainConfig:
    """``llmray pretrain``: model shape, data, loop, parallelism and Ray Train settings."""

    model: ModelConfig = param(default_factory=lambda: preset("tiny"), doc="model shape (see configs/model)")
    data: DataConfig = param(default_factory=DataConfig, doc="token shards and batch shape")
    train: TrainConfig = param(default_factory=TrainConfig, doc="the training loop")
    parallel: ParallelConfig = param(default_factory=ParallelConfig, doc="data parallelism strategy")
    ray: RayTrainConfig = param(default_factory=RayTrainConfig, doc="Ray Train workers and checkpoints")
    tokenizer: str | None = param(None, doc="tokenizer directory; null = the one named in the token manifest")
    resume_from: str | None = param(None, doc="checkpoint directory to start from when the run has none "
                                              "of its own (--resume-from)")

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
                             f"({self.model.max_seq_len})")
        microbatches = self.parallel.pipeline.microbatches
        if self.parallel.pp > 1 and self.data.micro_batch_size % microbatches:
            raise ValueError(f"data.micro_batch_size ({self.data.micro_batch_size}) must be divisible by "
                             f"parallel.pipeline.microbatches ({microbatches}): the schedule cuts each "
                             f"micro-batch into that many pipeline micro-batches")
        self.parallel.dims(self.ray.num_workers)  # degrees must multiply to the worker count

    def inputs(self) -> dict[str, str]:
        inputs = {"tokens": self.data.tokens}
        if self.resume_from:
            inputs["resume_from"] = self.resume_from
        return inputs


def tokenizer_dir(cfg: PretrainConfig, manifest: dict) -> Path | None:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    recorded = (manifest.get("tokenizer") or {}).get("path")
    return Path(recorded).parent if recorded and Path(recorded).is_file() else None


def token_byte_lengths(directory: Path, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes of each token id (special tokens 0), for bits per byte.

    Byte-level BPE spells every byte as one character of its alphabet, so a token's length in
    bytes is its string length; other tokenizers are measured by decoding each id.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    byte_level = (json.loads(tokenizer.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if index < vocab_size and token not in special:
            lengths[index] = len(token) if byte_level else len(tokenizer.decode([index]).encode("utf-8"))
    return lengths


def pretrain_worker(config: dict[str, Any]) -> None:
    """The per-worker training function Ray Train runs (also importable by SFT/DPO as a pattern)."""
    from llmray.model import llama
    from llmray.tokens.loader import TokenLoader
    from llmray.train import ray_train
    from llmray.train.metrics import MetricsWriter
    from llmray.train.objectives import CausalLM
    from llmray.train.trainer import Trainer, device_for_worker

    cfg: PretrainConfig = config["cfg"]
    ray_train.worker_setup(cfg.ray)
    rank, world = ray_train.world()
    shard, shards = cfg.parallel.data_shard(rank, world)
    device = device_for_worker()
    torch.manual_seed(cfg.train.seed)
    model = llama.build(cfg.model, device)
    d = cfg.data
    data = TokenLoader(d.tokens, seq_len=d.seq_len, batch_size=d.micro_batch_size, split="train", rank=shard,
                       world_size=shards, seed=d.seed, verify=d.verify)
    val_data = None
    try:
        TokenLoader(d.tokens, seq_len=d.seq_len, batch_size=d.micro_batch_size, split="val", rank=shard,
                    world_size=shards, shuffle=False, verify=d.verify)

        def val_data():
            return TokenLoader(d.tokens, seq_len=d.seq_len, batch_size=d.micro_batch_size, split="val",
                               rank=shard, world_size=shards, shuffle=False, verify=False)
    except ValueError as exc:  # no val split, or too small for one batch per worker
        if rank == 0:
            log.warning("no validation: %s", exc)
    token_bytes = token_byte_lengths(Path(config["tokenizer_dir"]), cfg.model.vocab_size) \
        if config.get("tokenizer_dir") else None
    writer = MetricsWriter(config["metrics_path"], config["tensorboard_dir"], cfg.train.log_every) \
        if rank == 0 else None
    trainer = Trainer(cfg.train, model, CausalLM(), data, parallel=cfg.parallel,
                      store=ray_train.RayCheckpointStore(log.warning), val_data=val_data,
                      token_bytes=token_bytes, flops_per_token=cfg.model.flops_per_token(d.seq_len),
                      writer=writer, hooks=config.get("hooks", ()))
    try:
        trainer.fit(resume_from=cfg.resume_from)
    finally:
        if writer is not None:
            writer.close()


def run_pretrain(cfg: PretrainConfig, ctx, hooks: tuple = ()) -> dict:
    """Train on Ray, then export the final weights; ``hooks`` run in every worker after each step."""
    from llmray.model import hf, llama
    from llmray.tokens import shards as shards_lib
    from llmray.train import checkpoint as ckpt
    from llmray.train import ray_train

    manifest = shards_lib.read_manifest(cfg.data.tokens)
    if manifest["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                         f"({manifest['vocab_size']}) recorded in {cfg.data.tokens}/manifest.json")
    tokenizer = tokenizer_dir(cfg, manifest)
    ctx.connect_ray()
    name = cfg.ray.name or f"{ctx.run_name}-{ctx.stage}"
    storage = Path(cfg.ray.storage_path).resolve() if cfg.ray.storage_path else ctx.dir.work / "ray"
    ctx.logger.info("pretraining %s (%.2fM parameters) on %d worker(s), strategy %s; checkpoints in %s",
                    name, cfg.model.num_params() / 1e6, cfg.ray.num_workers, cfg.parallel.strategy, storage / name)
    loop_config = {"cfg": cfg, "metrics_path": str(ctx.dir.root / "metrics.jsonl"),
                   "tensorboard_dir": str(ctx.dir.root / "tensorboard"),
                   "tokenizer_dir": str(tokenizer) if tokenizer else None, "hooks": tuple(hooks)}
    run = ray_train.fit(pretrain_worker, loop_config, cfg.ray, name=name, storage_path=storage)
    if run.checkpoint is None:
        raise ray_train.TrainingFailed(f"run {name!r} finished without a complete checkpoint in {run.storage}")
    model = llama.build(cfg.model, "cpu", init=False)
    ckpt.load_model_weights(run.checkpoint, model)
    hf.export(ctx.output / "model", cfg.model, model.state_dict(), tokenizer_dir=tokenizer)
    state = ckpt.read_trainer_state(run.checkpoint, 0)
    summary = {"steps": int(state["step"]), "checkpoint": str(run.checkpoint),
               **{k: run.metrics[k] for k in ("loss", "val_loss", "val_bpb", "tokens_per_s", "mfu")
                  if k in run.metrics},
               "guard": state["guard"]["counts"]}
    runs.write_json(ctx.output / "training.json", summary)
    return summary

"""Helpers shared by the training tests: real text as token shards, and a tiny model.

Shards are written with the production :class:`~llmray.tokens.shards.ShardWriter` and manifest
format, from real files of this machine (Python standard-library sources), tokenized as bytes
(id = byte + 1, BOS = 0) so no tokenizer training is needed and the loss has real structure.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import torch

from llmray import runs
from llmray.model import llama
from llmray.model.config import preset
from llmray.tokens import shards as shards_lib
from llmray.train.objectives import CausalLM

BOS = 0


def stdlib_texts(count: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:count]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def write_byte_shards(directory: Path, texts: list[str], val_every: int = 5, shard_tokens: int = 20000) -> Path:
    """Every ``val_every``-th document goes to the val split; returns ``directory``."""
    dtype = shards_lib.token_dtype(257)
    writers = {s: shards_lib.ShardWriter(directory, s, dtype, shard_tokens) for s in shards_lib.SPLITS}
    for i, text in enumerate(texts):
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + 1
        split = "val" if i % val_every == val_every - 1 else "train"
        writers[split].add(np.concatenate([[BOS], ids]), "stdlib")
    splits = {s: w.finish() for s, w in writers.items()}
    runs.write_json(directory / shards_lib.MANIFEST, {
        "format": shards_lib.FORMAT, "dtype": dtype.name, "byte_order": "little", "vocab_size": 257,
        "bos_id": BOS, "eos_id": None, "pad_id": None, "splits": splits,
        "source_mixture": shards_lib.source_mixture(splits)})
    return directory


def byte_token_lengths() -> torch.Tensor:
    """UTF-8 bytes of each byte-token: BOS 0, every byte 1."""
    lengths = torch.ones(257, dtype=torch.int64)
    lengths[BOS] = 0
    return lengths


def tiny_model(seed: int = 0, device: str = "cpu", **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return llama.build(preset("tiny", **{"vocab_size": 257, "max_seq_len": 64, **overrides}), device)


SEQ_LEN = 32


class Faulty(CausalLM):
    """Causal LM whose loss is multiplied by ``factor`` (nan, 20, ...) on the given 1-based calls."""

    def __init__(self, calls: set[int], factor: float = math.nan):
        self.calls, self.factor, self.n = calls, factor, 0

    def corrupt(self, loss_sum: torch.Tensor) -> torch.Tensor:
        return loss_sum * self.factor

    def loss(self, model, batch):
        out = super().loss(model, batch)
        self.n += 1
        if self.n in self.calls:
            out.loss_sum = self.corrupt(out.loss_sum)
        return out


class NaNGradients(Faulty):
    """Causal LM whose loss stays right on the given calls but whose gradients are all NaN: the
    loss gains 0·sqrt(0·loss), which is 0 forward and 0·∞ backward."""

    def corrupt(self, loss_sum: torch.Tensor) -> torch.Tensor:
        return loss_sum + 0.0 * torch.sqrt(loss_sum * 0.0)


def make_trainer(shards: Path, *, steps: int, batch: int = 4, accum: int = 1, seed: int = 0, store=None,
                 objective=None, hooks=(), guards=None, checkpoint_every: int = 0, writer=None,
                 init_seed: int = 0, parallel=None, lr: float = 3e-3, optimizer=None):
    """A Trainer on the byte shards; rank and world size come from torch.distributed when initialised.

    ``optimizer`` (an ``OptimizerConfig``) replaces the default AdamW at ``lr``."""
    import torch.distributed as dist

    from llmray.tokens.loader import TokenLoader
    from llmray.train.guards import GuardConfig
    from llmray.train.schedule import ScheduleConfig
    from llmray.train.trainer import OptimizerConfig, TrainConfig, Trainer

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cfg = TrainConfig(steps=steps, grad_accum=accum, optimizer=optimizer or OptimizerConfig(lr=lr),
                      schedule=ScheduleConfig(warmup_steps=2), log_every=5, eval_batches=2,
                      checkpoint_every=checkpoint_every, guards=guards or GuardConfig(), seed=seed,
                      peak_flops=1e11)
    data = TokenLoader(shards, seq_len=SEQ_LEN, batch_size=batch, seed=seed, rank=rank, world_size=world)

    def val():
        return TokenLoader(shards, split="val", seq_len=SEQ_LEN, batch_size=batch, shuffle=False,
                           rank=rank, world_size=world)
    return Trainer(cfg, tiny_model(init_seed), objective or CausalLM(), data, parallel=parallel, store=store,
                   val_data=val, token_bytes=byte_token_lengths(), flops_per_token=1000, writer=writer,
                   hooks=hooks)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(world_size: int, fn, *args) -> None:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks (spawned processes, 1 thread each)."""
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       start_method="spawn")


def _gloo_entry(rank: int, world_size: int, port: int, fn, args) -> None:
    import os
    import sys

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()
    # Exit without interpreter teardown once the work is done and written: DeepSpeed keeps its gloo
    # sub-groups referenced, and their threads, still joinable during C++ static destruction, abort
    # the process ("terminate called without an active exception") in about 1 exit of 3.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

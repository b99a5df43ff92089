"""Helpers shared by the training tests: real text as token shards, and a tiny model.

Shards are written with the production :class:`~llmray.tokens.shards.ShardWriter` and manifest
format, from real files of this machine (Python standard-library sources), tokenized as bytes
(id = byte + 1, BOS = 0) so no tokenizer training is needed and the loss has real structure.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

from llmray import runs
from llmray.model import llama
from llmray.model.config import preset
from llmray.tokens import shards as shards_lib

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


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return llama.build(preset("tiny", **{"vocab_size": 257, "max_seq_len": 64, **overrides}))

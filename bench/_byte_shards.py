"""Token shards for the training benchmarks: real text as bytes.

Byte ids (byte + 1, BOS = 0) need no tokenizer training; a step's cost depends only on the model
shape and batch, not on which ids flow through it, and bits per byte is exact (BOS counts no
bytes). Written with the production ShardWriter and manifest format, so the real TokenLoader
reads them.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from llmray import runs
from llmray.tokens import shards as shards_lib


def write_documents(directory: Path, documents: Iterable[tuple[bytes, str, str]], shard_tokens: int) -> Path:
    """Shards of ``(text bytes, source, split)`` documents, each opened by BOS; returns ``directory``."""
    dtype = shards_lib.token_dtype(257)
    writers = {s: shards_lib.ShardWriter(directory, s, dtype, shard_tokens) for s in shards_lib.SPLITS}
    for data, source, split in documents:
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + 1
        writers[split].add(np.concatenate([[0], ids]), source)
    splits = {s: w.finish() for s, w in writers.items()}
    runs.write_json(directory / shards_lib.MANIFEST, {
        "format": shards_lib.FORMAT, "dtype": dtype.name, "byte_order": "little", "vocab_size": 257,
        "bos_id": 0, "eos_id": None, "pad_id": None, "splits": splits,
        "source_mixture": shards_lib.source_mixture(splits)})
    return directory


def token_bytes() -> torch.Tensor:
    """UTF-8 bytes of each byte-token: BOS 0, every byte 1 (for bits per byte)."""
    lengths = torch.ones(257, dtype=torch.int64)
    lengths[0] = 0
    return lengths


def write(directory: Path, max_bytes: int = 8_000_000) -> Path:
    """This machine's Python standard-library sources, every 50th file held out, up to ``max_bytes``."""
    if (directory / shards_lib.MANIFEST).is_file():
        return directory

    def documents():
        total = 0
        for i, path in enumerate(sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))):
            data = path.read_bytes()
            yield data, "stdlib", "val" if i % 50 == 49 else "train"
            total += len(data)
            if total >= max_bytes:
                return
    return write_documents(directory, documents(), 1_000_000)

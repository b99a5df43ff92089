"""Token directories for loader/shard tests, written with the real ShardWriter.

Token values are their global position (uint32), so a test can tell exactly which stretch of
which shard every batch row came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmray import runs
from llmray.tokens import shards


def write_positional_shards(directory: Path, doc_lengths: list[int], shard_tokens: int,
                            split: str = "train") -> dict:
    dtype = shards.token_dtype(1 << 20)  # uint32: room for positions as token values
    writer = shards.ShardWriter(directory, split, dtype, shard_tokens)
    position = 0
    for index, length in enumerate(doc_lengths):
        writer.add(np.arange(position, position + length), source=f"s{index % 2}")
        position += length
    splits = {split: writer.finish()}
    manifest = {"format": shards.FORMAT, "dtype": dtype.name, "byte_order": "little", "vocab_size": 1 << 20,
                "bos_id": 0, "eos_id": 1, "pad_id": 2, "splits": splits,
                "source_mixture": shards.source_mixture(splits)}
    runs.write_json(directory / shards.MANIFEST, manifest)
    return manifest

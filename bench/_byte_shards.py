"""Token shards for the training benchmarks: real text (this machine's Python standard library) as bytes.

Byte ids (byte + 1, BOS = 0) need no tokenizer training; a step's cost depends only on the model
shape and batch, not on which ids flow through it. Written with the production ShardWriter and
manifest format, so the real TokenLoader reads them.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from llmray import runs
from llmray.tokens import shards as shards_lib


def write(directory: Path, max_bytes: int = 8_000_000) -> Path:
    if (directory / shards_lib.MANIFEST).is_file():
        return directory
    dtype = shards_lib.token_dtype(257)
    writers = {s: shards_lib.ShardWriter(directory, s, dtype, 1_000_000) for s in shards_lib.SPLITS}
    total = 0
    for i, path in enumerate(sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))):
        ids = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64) + 1
        writers["val" if i % 50 == 49 else "train"].add(np.concatenate([[0], ids]), "stdlib")
        total += len(ids)
        if total >= max_bytes:
            break
    splits = {s: w.finish() for s, w in writers.items()}
    runs.write_json(directory / shards_lib.MANIFEST, {
        "format": shards_lib.FORMAT, "dtype": dtype.name, "byte_order": "little", "vocab_size": 257,
        "bos_id": 0, "eos_id": None, "pad_id": None, "splits": splits,
        "source_mixture": shards_lib.source_mixture(splits)})
    return directory

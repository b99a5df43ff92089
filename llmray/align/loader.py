"""Micro-batches of rows (packed SFT rows, DPO pairs) per data-parallel rank, exactly resumable.

Rows are visited in the shared epoch order (:class:`~llmray.tokens.order.EpochOrder`) padded
with empty rows (-1), so every row appears exactly once per epoch whatever the world size; an
empty row carries no target (weight 0), so the loss is unchanged. ``state_dict()`` records the
position and the data fingerprint, seed and shuffle flag; ``load_state_dict`` refuses a state
from other data. ``epochs=1`` makes a finite loader (validation passes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from llmray.tokens.order import EpochOrder

STATE_FORMAT = "llmray-rows/1"
_IDENTITY_KEYS = ("seed", "shuffle", "data_sha256")


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """sha256 of arrays' dtypes, shapes and bytes: the one fingerprint of SFT rows and DPO pairs."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class RowSource(Protocol):
    def __len__(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """sha256 of the rows' contents (decides which checkpoints and caches belong to them)."""

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of the given rows; row -1 is an empty row (no targets)."""


class RowLoader:
    def __init__(self, source: RowSource, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, epochs: int | None = None):
        if len(source) == 0:
            raise ValueError("no rows to load")
        self.source = source
        self.batch_size, self.seed, self.shuffle, self.epochs = batch_size, seed, shuffle, epochs
        self.data_sha256 = source.fingerprint
        self.order = EpochOrder(len(source), batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                shuffle=shuffle, pad=True)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        epoch, rows = self.order.peek()
        if self.epochs is not None and epoch >= self.epochs:
            raise StopIteration
        self.order.advance()
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.source.batch(rows).items()}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, **self.order.state(), "seed": self.seed, "shuffle": self.shuffle,
                "data_sha256": self.data_sha256, "batch_size": self.batch_size, "world_size": self.order.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a row-loader state: format {state.get('format')!r}, expected {STATE_FORMAT}")
        for key in _IDENTITY_KEYS:
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state is for other data: {key} {state[key]!r} != {getattr(self, key)!r}")
        self.order.restore(state)


@dataclass
class RowData:
    """A picklable recipe for one data-parallel shard's :class:`RowLoader`: ``RowData(...)(shard, shards)``."""

    rows: RowSource
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    epochs: int | None = None

    def __call__(self, shard: int, shards: int) -> RowLoader:
        return RowLoader(self.rows, batch_size=self.batch_size, rank=shard, world_size=shards, seed=self.seed,
                         shuffle=self.shuffle, epochs=self.epochs)

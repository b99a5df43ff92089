"""Micro-batches of rows (packed SFT rows, DPO pairs) per data-parallel rank, exactly resumable.

The same scheme as the pretraining token loader, over rows instead of windows:

* epoch ``e`` visits the rows in the order of a permutation from ``numpy.random.default_rng([seed, e])``
  (identity when ``shuffle`` is off), then **pads the order with empty rows (-1)** up to a
  multiple of ``batch_size × world_size``: every row appears exactly once per epoch, whatever the
  world size; an empty row carries no target (weight 0), so the loss is unchanged;
* batch ``k`` of rank ``r`` takes order entries ``k·B·W + r, k·B·W + r + W, …`` (ranks interleave, so
  one worker and two workers with half the batch see the same global batch: the equivalence tests
  rely on this);
* the position is ``(epoch, consumed)``; ``state_dict()`` also records the data fingerprint, seed
  and shuffle flag, and ``load_state_dict`` refuses a state from other data.

``epochs=1`` makes a finite loader (validation passes).
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Protocol

import numpy as np
import torch

STATE_FORMAT = "llmray-rows/1"
_IDENTITY_KEYS = ("seed", "shuffle", "data_sha256")


class RowSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of the given rows; row -1 is an empty row (no targets)."""


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class RowLoader:
    def __init__(self, source: RowSource, *, batch_size: int, data_sha256: str, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, epochs: int | None = None):
        if len(source) == 0:
            raise ValueError("no rows to load")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.source = source
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.data_sha256 = data_sha256
        self.epoch, self.consumed = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        return -(-len(self.source) // self.global_batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices of ``epoch`` in visiting order, padded with -1 to a multiple of B·W."""
        n = len(self.source)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        padding = self.batches_per_epoch() * self.global_batch - n
        return np.concatenate([order, np.full(padding, -1, dtype=np.int64)])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.consumed >= self.batches_per_epoch() * self.global_batch:
            self.epoch, self.consumed = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        rows = self._order[self.consumed + self.rank: self.consumed + self.global_batch: self.world_size]
        self.consumed += self.global_batch
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.source.batch(rows).items()}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "shuffle": self.shuffle, "data_sha256": self.data_sha256, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a row-loader state: format {state.get('format')!r}, expected {STATE_FORMAT}")
        for key in _IDENTITY_KEYS:
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state is for other data: {key} {state[key]!r} != {getattr(self, key)!r}")
        if state["consumed"] % self.global_batch:
            raise ValueError(f"cannot resume: {state['consumed']} rows consumed is not a multiple of the "
                             f"global batch {self.global_batch}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

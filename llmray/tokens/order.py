"""Which items each data-parallel rank takes next: the epoch order both loaders share.

* Epoch ``e`` visits items in the order of a permutation from ``numpy.random.default_rng([seed, e])``
  (identity when ``shuffle`` is off).
* Batch ``k`` of rank ``r`` takes order entries ``k·B·W + r, k·B·W + r + W, …`` (``W`` ranks
  interleave), so after ``k`` batches the ranks together have used exactly the first ``k·B·W``
  entries, and one worker with batch ``B·W`` sees the same global batch as ``W`` workers.
* An epoch ends when fewer than ``B·W`` entries are left. With ``pad`` the order is first padded
  with ``-1`` to a multiple of ``B·W`` (every item once per epoch: SFT/DPO rows, where an empty
  row weighs nothing); without it the leftovers are skipped that epoch (pretraining windows).
* The position is ``(epoch, consumed)``; a position saved under one ``(B, W)`` restores under
  another as long as ``consumed`` is a multiple of the new ``B·W``.
"""

from __future__ import annotations

import numpy as np


class EpochOrder:
    def __init__(self, items: int, *, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 pad: bool):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank {rank}, world_size {world_size}")
        self.items, self.batch_size, self.rank, self.world_size = items, batch_size, rank, world_size
        self.seed, self.shuffle, self.pad = seed, shuffle, pad
        self.epoch, self.consumed = 0, 0
        self._cached_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.items // self.global_batch) if self.pad else self.items // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """Item indices of ``epoch`` in visiting order (padded with -1 when ``pad``)."""
        if self._cached_epoch != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.items) if self.shuffle
                     else np.arange(self.items, dtype=np.int64))
            if self.pad:
                padding = self.batches_per_epoch * self.global_batch - self.items
                order = np.concatenate([order, np.full(padding, -1, dtype=np.int64)])
            self._order, self._cached_epoch = order, epoch
        return self._order

    def _position(self) -> tuple[int, int]:
        """Where the next batch starts: the current position, or the start of the next epoch."""
        if self.consumed + self.global_batch > self.batches_per_epoch * self.global_batch:
            return self.epoch + 1, 0
        return self.epoch, self.consumed

    def peek(self) -> tuple[int, np.ndarray]:
        """(epoch, item indices) of this rank's next batch, without advancing."""
        epoch, consumed = self._position()
        return epoch, self.order(epoch)[consumed + self.rank: consumed + self.global_batch: self.world_size]

    def advance(self) -> None:
        self.epoch, self.consumed = self._position()
        self.consumed += self.global_batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def restore(self, state: dict) -> None:
        if state["consumed"] % self.global_batch:
            raise ValueError(f"cannot resume: {state['consumed']} items consumed this epoch is not a multiple of "
                             f"batch_size x world_size = {self.global_batch}; resume with a batch shape that "
                             f"divides it")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

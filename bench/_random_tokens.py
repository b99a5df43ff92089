"""Seeded random token rows for the benches that measure memory or speed, not learning.

The same global batch on every rank (one generator, one seed); each data-parallel rank keeps its
slice of the rows, so layouts see the same data however the batch is split.
"""

from __future__ import annotations

import torch


class RandomTokens:
    """(rows / dp, seq + 1) int64 batches of ids below ``vocab``: data-parallel rank ``dp_rank``'s share."""

    def __init__(self, vocab: int, rows: int, seq: int, dp_rank: int = 0, dp: int = 1, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab, self.rows, self.seq, self.dp_rank, self.dp = vocab, rows, seq, dp_rank, dp

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch = torch.randint(0, self.vocab, (self.rows, self.seq + 1), generator=self.generator)
        share = self.rows // self.dp
        return batch[self.dp_rank * share:(self.dp_rank + 1) * share]

    def state_dict(self) -> dict:
        return {}

"""Packed ``(B, T+1)`` training batches from token shards, per data-parallel rank, exactly resumable.

Usage (one loader per data-parallel rank)::

    loader = TokenLoader("runs/x/tokens/output", split="train", seq_len=T, batch_size=B,
                         rank=dp_rank, world_size=dp_size, seed=0)
    for step, batch in zip(range(steps), loader):   # batch: torch.int64 (B, T+1)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        ...
        checkpoint["loader"] = loader.state_dict()       # small JSON-able dict
    loader.load_state_dict(checkpoint["loader"])         # the next batch is the one that followed

How sequences are made and ordered:

* **Windows**: the split's shards, in manifest order, are one stream of ``N`` tokens, cut into
  ``(N - 1) // T`` windows of ``T + 1`` tokens with stride ``T`` (window ``w`` = tokens
  ``[wT, wT + T + 1)`` of the stream), so consecutive windows share one token and every
  next-token transition is a target exactly once; only the < T tokens at the stream's end are
  unused. Windows pack across documents (each starts with BOS), as in GPT-style pretraining, and
  across shards, so how the tokens stage cut its work units (many small validation shards, say)
  wastes nothing.
* **Order**: windows are visited in
  the shared epoch order (:class:`~llmray.tokens.order.EpochOrder`: a seeded permutation per
  epoch, ranks interleaved, position ``(epoch, consumed)``); the fewer than ``B*W`` windows left
  at an epoch's end are skipped that epoch. Shards are memory-mapped, so a batch reads ``B``
  windows and no shard is loaded into RAM.
* **Integrity**: every shard's size is checked against the manifest; with ``verify=True`` (the
  default) its sha256 too, and a mismatch raises :class:`~llmray.tokens.shards.ShardError`
  naming the shard. ``state_dict()`` records a fingerprint of the shard list, and
  ``load_state_dict`` refuses a state from different shards, seed, sequence length or split.

``state_dict()`` format (version 1)::

    {"format": "llmray-loader/2", "epoch": int, "consumed": int, "seed": int, "seq_len": int,
     "split": str, "shuffle": bool, "data_sha256": str, "batch_size": int, "world_size": int}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llmray import storage
from llmray.tokens import shards as shards_lib
from llmray.tokens.order import EpochOrder

STATE_FORMAT = "llmray-loader/2"  # /1 cut windows inside each shard: its positions mean other tokens
# Keys whose values must match for a saved state to describe this loader's sequence of batches.
_IDENTITY_KEYS = ("seed", "seq_len", "split", "shuffle", "data_sha256")


class TokenLoader:
    """Iterator of packed ``torch.int64`` batches of shape ``(batch_size, seq_len + 1)`` for one rank."""

    def __init__(self, directory: str | Path, *, seq_len: int, batch_size: int, split: str = "train",
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 verify: bool = True) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        self.directory = storage.normalize(directory)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.split, self.seed, self.shuffle = split, seed, shuffle
        manifest = shards_lib.read_manifest(self.directory)
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.vocab_size = manifest["vocab_size"]
        self.bos_id = manifest["bos_id"]
        entries = shards_lib.split_shards(manifest, split, self.directory)
        self._paths = [shards_lib.check_shard(self.directory, e, self.dtype, verify) for e in entries]
        self._maps: list[np.memmap | None] = [None] * len(entries)
        self._first_token = np.concatenate([[0], np.cumsum([e["tokens"] for e in entries])]).astype(np.int64)
        self.num_windows = max(0, int(self._first_token[-1]) - 1) // seq_len
        self.order = EpochOrder(self.num_windows, batch_size=batch_size, rank=rank, world_size=world_size,
                                seed=seed, shuffle=shuffle, pad=False)
        self.batches_per_epoch = self.order.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise ValueError(f"split {split!r} of {self.directory} has {self.num_windows} windows of "
                             f"{seq_len + 1} tokens, fewer than one step needs "
                             f"(batch_size {batch_size} x world_size {world_size})")
        self.data_sha256 = hashlib.sha256(json.dumps(
            [[e["path"], e["tokens"], e["sha256"]] for e in entries]).encode()).hexdigest()

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        _, windows = self.order.peek()
        self.order.advance()
        return torch.from_numpy(self._gather(windows))

    def windows_of_next_batch(self) -> np.ndarray:
        """Global window numbers the next batch of this rank will hold (for tests and debugging)."""
        return self.order.peek()[1].copy()

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def _gather(self, windows: np.ndarray) -> np.ndarray:
        out = np.empty((len(windows), self.seq_len + 1), dtype=np.int64)  # (B, T+1)
        for row, window in enumerate(windows):
            self._read(int(window) * self.seq_len, out[row])
        return out

    def _read(self, start: int, out: np.ndarray) -> None:
        """Stream tokens ``[start, start + len(out))`` into ``out``, across shard ends."""
        shard = int(np.searchsorted(self._first_token, start, side="right")) - 1
        done = 0
        while done < len(out):
            offset = start + done - int(self._first_token[shard])
            piece = self._shard(shard)[offset: offset + len(out) - done]
            out[done: done + len(piece)] = piece
            done += len(piece)
            shard += 1

    def _shard(self, index: int) -> np.memmap:
        if self._maps[index] is None:
            self._maps[index] = shards_lib.open_shard(self._paths[index], self.dtype)
        return self._maps[index]

    # -- exact resume ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, **self.order.state(), "seed": self.seed,
                "seq_len": self.seq_len, "split": self.split, "shuffle": self.shuffle,
                "data_sha256": self.data_sha256, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        mine = self.state_dict()
        different = [f"{k}: saved {state.get(k)!r}, this loader {mine[k]!r}"
                     for k in _IDENTITY_KEYS if state.get(k) != mine[k]]
        if different:
            raise ValueError("loader state belongs to a different data order; " + "; ".join(different))
        self.order.restore(state)


@dataclass
class TokenData:
    """A picklable recipe for one data-parallel shard's :class:`TokenLoader`: ``TokenData(...)(shard, shards)``.

    Shards are hashed (``verify``) by the first loader a process makes from the recipe only; later
    ones (each validation pass makes a fresh loader) skip it.
    """

    directory: str
    split: str
    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    verify: bool = True

    def __call__(self, shard: int, shards: int) -> TokenLoader:
        loader = TokenLoader(self.directory, seq_len=self.seq_len, batch_size=self.batch_size, split=self.split,
                             rank=shard, world_size=shards, seed=self.seed, shuffle=self.shuffle, verify=self.verify)
        self.verify = False
        return loader

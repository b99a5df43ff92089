"""Training objectives: what the one training loop minimises, as interchangeable objects.

An objective turns one micro-batch into a *summed* loss and the weight it is summed over
(target tokens for language modelling, pairs for DPO). The trainer adds both up over the
micro-batches of a step and over data-parallel ranks and divides once, so a step's loss and
gradient are the mean over the whole global batch however it is split into micro-batches and
ranks (exact equivalence of gradient accumulation and data parallelism, also when the masked
SFT loss gives micro-batches different token counts).

Objectives only touch ``model(tokens)``; they know nothing of parallelism or Ray. SFT's masked
loss and DPO's preference loss are further classes with the same two methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: sum of per-item losses of the micro-batch
    weight: int  # how many items were summed (target tokens, pairs)


class Objective(Protocol):
    def weight(self, batch: Any) -> int:
        """Items the loss of ``batch`` is summed over (known before the forward pass)."""

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """Forward ``batch`` through ``model`` and return its summed loss."""


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, fp32: logits (B, T, V), targets (B, T) → (B, T).

    Targets equal to :data:`IGNORE_INDEX` get loss 0.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)


class CausalLM:
    """Next-token prediction on packed rows: batch (B, T+1) int64 → inputs [:, :-1], targets [:, 1:]."""

    def weight(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def token_losses(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(nats (B, T), targets (B, T)) for every predicted position."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        return token_cross_entropy(model(inputs), targets), targets

    def loss(self, model: nn.Module, batch: torch.Tensor) -> LossOutput:
        nats, _ = self.token_losses(model, batch)
        return LossOutput(nats.sum(), self.weight(batch))


def bits_per_byte(nats: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> tuple[float, int]:
    """Summed bits and bytes of the predicted tokens: (total_nats / ln 2, total UTF-8 bytes).

    Tokenizer-independent (nanochat's ``evaluate_bpb``): tokens with 0 bytes (special tokens such
    as BOS) are left out of both sums. ``token_bytes[id]`` is the UTF-8 length of token ``id``.
    Callers sum both figures over batches and ranks, then divide.
    """
    nbytes = token_bytes[targets.clamp(min=0)] * (targets != IGNORE_INDEX)
    counted = nbytes > 0
    return float((nats * counted).sum()) / math.log(2), int(nbytes.sum())

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmray.model.linear_cross_entropy import IGNORE_INDEX, cross_entropy_sum


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: sum of per-item losses of the micro-batch
    weight: int  # how many items were summed (target tokens, pairs)


class Objective:
    """What the trainer minimises; every hook the trainer calls is declared here.

    Subclasses implement :meth:`weight` and :meth:`loss`. Objectives that are next-token losses on
    ``(inputs, targets)`` pairs set ``token_targets`` and implement :meth:`inputs_and_targets` and
    :meth:`pipeline_loss`: pipeline parallelism and bits-per-byte validation need that form.
    """

    token_targets: bool = False

    def weight(self, batch: Any) -> int:
        """Items the loss of ``batch`` is summed over (known before the forward pass)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """Forward ``batch`` through ``model`` and return its summed loss."""
        raise NotImplementedError

    def tokens(self, batch: Any) -> int:
        """Tokens the batch feeds the model (for tokens/s and MFU)."""
        return self.weight(batch)

    def inputs_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is not a loss on (inputs, targets) pairs")

    def pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed loss from the last pipeline stage's logits."""
        raise NotImplementedError(f"{type(self).__name__} cannot run under pipeline parallelism")


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, fp32: logits (B, T, V), targets (B, T) → (B, T).

    Targets equal to :data:`IGNORE_INDEX` get loss 0.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)


class CausalLM(Objective):
    """Next-token prediction on packed rows: batch (B, T+1) int64 → inputs [:, :-1], targets [:, 1:].

    ``z_loss`` > 0 adds PaLM's auxiliary ``z_loss · logsumexp(logits)²`` per predicted token, which
    keeps the softmax normalizer near zero (a guard against logit drift in long bf16 runs). It is
    part of the training loss (and of the logged ``loss``); validation loss and bits per byte are
    the plain cross-entropy.
    """

    token_targets = True
    z_loss = 0.0  # subclasses with their own __init__ keep plain cross-entropy

    def __init__(self, z_loss: float = 0.0):
        self.z_loss = z_loss

    def weight(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def inputs_and_targets(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[:, :-1], batch[:, 1:]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> LossOutput:
        inputs, targets = self.inputs_and_targets(batch)
        return LossOutput(model(inputs, targets=targets, z_loss=self.z_loss), self.weight(batch))

    def pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, targets, self.z_loss)


def bits_per_byte(nats: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> tuple[float, int]:
    """Summed bits and bytes of the predicted tokens: (total_nats / ln 2, total UTF-8 bytes).

    Tokenizer-independent (nanochat's ``evaluate_bpb``): tokens with 0 bytes (special tokens such
    as BOS) are left out of both sums. ``token_bytes[id]`` is the UTF-8 length of token ``id``.
    Callers sum both figures over batches and ranks, then divide.
    """
    nbytes = token_bytes[targets.clamp(min=0)] * (targets != IGNORE_INDEX)
    counted = nbytes > 0
    return float((nats * counted).sum()) / math.log(2), int(nbytes.sum())


# ---------------------------------------------------------------------------------------------
# Instruction tuning and preference alignment (llmray.align builds their batches)
# ---------------------------------------------------------------------------------------------

class MaskedLM(Objective):
    """SFT: next-token loss on assistant tokens only.

    batch: ``inputs`` (B, T), ``targets`` (B, T) with :data:`IGNORE_INDEX` wherever the target is
    not an assistant token, optional ``segment_ids`` (B, T) of conversations packed in a row.
    """

    def weight(self, batch: dict) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def tokens(self, batch: dict) -> int:
        return batch["inputs"].numel()

    def loss(self, model: nn.Module, batch: dict) -> LossOutput:
        loss_sum = model(batch["inputs"], segment_ids=batch.get("segment_ids"), targets=batch["targets"])
        return LossOutput(loss_sum, self.weight(batch))


def sequence_logps(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's non-ignored targets: (N, T), (N, T) → (N,) fp32."""
    return -token_cross_entropy(model(inputs), targets).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             ipo: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards, from sequence log-probs (each (N,)).

    With h = log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x):

    * DPO (Rafailov et al. 2023, eq. 7):  L = −log σ(β·h)
    * conservative DPO (labels flipped with probability ε; Mitchell 2023, "A note on DPO with
      noisy preferences"):  L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
    * IPO (Azar et al. 2023, eq. 17, sequence log-ratios):  L = (h − 1/(2β))²

    Implicit rewards (DPO eq. 5, up to the partition term): r = β·log πθ(y|x)/π_ref(y|x).
    Returns (losses, chosen_rewards, rejected_rewards), rewards detached.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPO(Objective):
    """Preference loss on pairs whose reference log-probs were precomputed (no reference model here).

    batch: ``inputs`` / ``targets`` (2N, T): the N chosen rows, then the N rejected rows, targets
    :data:`IGNORE_INDEX` outside each final assistant reply; ``reference_logps`` (2N,) in the same
    order; ``valid`` (N,) 1 for a real pair, 0 for loader padding.
    """

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False):
        self.beta, self.label_smoothing, self.ipo = beta, label_smoothing, ipo

    def weight(self, batch: dict) -> int:
        return int(batch["valid"].sum())

    def tokens(self, batch: dict) -> int:
        return batch["inputs"].numel()

    def pair_terms(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per pair (N,): loss, chosen/rejected implicit rewards and policy log-probs; 0 where not ``valid``."""
        policy = sequence_logps(model, batch["inputs"], batch["targets"])
        reference = batch["reference_logps"].to(policy.dtype)
        losses, chosen, rejected = dpo_loss(*policy.chunk(2), *reference.chunk(2), beta=self.beta,
                                            label_smoothing=self.label_smoothing, ipo=self.ipo)
        valid = batch["valid"].to(losses.dtype)
        policy_chosen, policy_rejected = policy.detach().chunk(2)
        return {"loss": losses * valid, "chosen_reward": chosen * valid, "rejected_reward": rejected * valid,
                "chosen_logp": policy_chosen * valid, "rejected_logp": policy_rejected * valid}

    def loss(self, model: nn.Module, batch: dict) -> LossOutput:
        return LossOutput(self.pair_terms(model, batch)["loss"].sum(), self.weight(batch))

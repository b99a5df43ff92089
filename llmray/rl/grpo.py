"""GRPO's objective: group-relative advantages and the clipped policy-ratio loss with a KL anchor.

For completions o_1..o_G of one prompt with rewards r_i (Shao et al. 2024, DeepSeekMath §4.1):

* advantage  A_i = (r_i − mean(r)) / (std(r) + ε)  (``scale_rewards: group``; std unbiased, ε 1e-4),
  or  A_i = r_i − mean(r)  (``scale_rewards: none``, Dr. GRPO, Liu et al. 2025 §3.1: the std
  division favours prompts that are too easy or too hard);
* per token t of o_i, with ρ = π_θ(o_it) / π_old(o_it) (π_old: the policy that sampled o_i):
  ℓ_it = −min(ρ·A_i, clip(ρ, 1 − ε_low, 1 + ε_high)·A_i) + β·KL_it,
  KL_it = exp(q) − q − 1 with q = log π_ref(o_it) − log π_θ(o_it)  (Schulman's k3 estimator:
  unbiased, always ≥ 0); β = ``kl_coef`` (0 drops the reference model altogether).
  ``clip_high`` > ``clip_low`` is DAPO's clip-higher (Yu et al. 2025 §3.1).

Aggregation (how token losses become the step's loss; a one-line difference each):

* ``token_mean`` (default; DAPO §3.3): Σ ℓ_it / Σ |o_i| over the whole step, so every token
  weighs the same and long completions are not diluted;
* ``sequence_mean`` (the GRPO paper): mean over sequences of each sequence's token mean;
* ``constant`` (Dr. GRPO): Σ ℓ_it / (number of sequences × ``max_new_tokens``), no length bias.

The objective returns the *sum* and its weight; the trainer divides once over micro-batches and
ranks (:mod:`llmray.train.objectives`), so every aggregation is exact under accumulation and
data parallelism.

The learner's rows share prompts (:func:`grpo_batch`): a group's completions follow one copy of
their prompt, each attending to the prompt and to itself only, so the prompt's tokens go through
the model once per row instead of once per completion. With the RL bench's shapes (a ~20-token
prompt, 8 completions of up to 16 tokens) that halves the learner's tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch
from torch import nn

from llmray.config import param
from llmray.model import shared_context
from llmray.train.objectives import LossOutput, Objective

Aggregation = Literal["token_mean", "sequence_mean", "constant"]


@dataclass
class GrpoConfig:
    """The policy loss and its advantages."""

    clip_low: float = param(0.2, doc="ε_low: the ratio is clipped below at 1 − clip_low", min=0.0, max=1.0)
    clip_high: float = param(0.2, doc="ε_high: the ratio is clipped above at 1 + clip_high (DAPO: 0.28)",
                             min=0.0)
    kl_coef: float = param(0.0, doc="β of the k3 KL penalty to the frozen reference (the initial policy); "
                                    "0 = no penalty and no reference model", min=0.0)
    aggregation: Aggregation = param("token_mean", doc="token_mean (DAPO), sequence_mean (GRPO paper), "
                                                       "constant (Dr. GRPO): see llmray.rl.grpo")
    scale_rewards: Literal["group", "none"] = param("group", doc="group: divide advantages by the group's "
                                                                 "reward std; none: Dr. GRPO's unscaled advantages")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """Advantages (N,) of rewards (N,) laid out as consecutive groups of ``group_size``."""
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1).to(rewards.dtype)


def policy_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                        advantages: torch.Tensor, cfg: GrpoConfig) -> torch.Tensor:
    """ℓ_it per token from its log-probs and its sequence's advantage (all the same shape); see the
    module docstring."""
    ratio = torch.exp(logps - old_logps)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * advantages)
    losses = -surrogate
    if cfg.kl_coef:
        q = ref_logps - logps
        losses = losses + cfg.kl_coef * (torch.exp(q) - q - 1)
    return losses


class _Scored(NamedTuple):
    context: Sequence[int]
    continuation: Sequence[int]


_PACKED_FIELDS = tuple(f.name for f in dataclasses.fields(shared_context.SharedContextRows))  # a batch carries them flat


def pack_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], max_row_tokens: int,
                   pad_id: int = 0) -> shared_context.SharedContextRows:
    """Prompt + completion sequences in rows where consecutive sequences of one prompt share it."""
    return shared_context.pack([_Scored(p, c) for p, c in zip(prompts, completions)], max_row_tokens, pad_id)


def grpo_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               old_logps: Sequence[torch.Tensor], ref_logps: Sequence[torch.Tensor] | None,
               advantages: Sequence[float], max_row_tokens: int, pad_id: int = 0) -> dict:
    """A learner micro-batch of sequences (prompt + completion): consecutive sequences of one prompt
    share a row (:mod:`llmray.model.shared_context`), the prompt computed once. Per completion token,
    in sequence order: ``old_logps`` (and ``ref_logps``); per sequence: ``advantages``."""
    packed = pack_sequences(prompts, completions, max_row_tokens, pad_id)
    batch = {name: getattr(packed, name) for name in _PACKED_FIELDS}
    batch["old_logps"] = torch.cat(list(old_logps)).float()
    if ref_logps is not None:
        batch["ref_logps"] = torch.cat(list(ref_logps)).float()
    batch["advantages"] = torch.tensor(list(advantages), dtype=torch.float32)
    return batch


class GRPO(Objective):
    """The GRPO policy loss on rollouts (a batch of :func:`grpo_batch`)."""

    def __init__(self, cfg: GrpoConfig, max_new_tokens: int):
        self.cfg, self.max_new_tokens = cfg, max_new_tokens

    def weight(self, batch: dict) -> int:
        if self.cfg.aggregation == "token_mean":
            return int(batch["targets"].numel())
        sequences = batch["advantages"].numel()
        return sequences * self.max_new_tokens if self.cfg.aggregation == "constant" else sequences

    def tokens(self, batch: dict) -> int:
        return batch["tokens"].numel()

    def loss(self, model: nn.Module, batch: dict) -> LossOutput:
        packed = shared_context.SharedContextRows(*(batch[name] for name in _PACKED_FIELDS))
        logps = shared_context.continuation_logps(model, packed)  # (N,)
        owners = packed.owners
        losses = policy_token_losses(logps, batch["old_logps"], batch.get("ref_logps"),
                                     batch["advantages"][owners], self.cfg)
        if self.cfg.aggregation == "sequence_mean":
            sequences = batch["advantages"].numel()
            per_sequence = losses.new_zeros(sequences).index_add(0, owners, losses)
            lengths = torch.bincount(owners, minlength=sequences).clamp(min=1)
            loss_sum = (per_sequence / lengths).sum()
        else:
            loss_sum = losses.sum()
        return LossOutput(loss_sum, self.weight(batch))

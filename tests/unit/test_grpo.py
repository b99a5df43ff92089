"""GRPO's loss and gradients against a plain per-token reference, for each aggregation variant."""

from __future__ import annotations

import math

import pytest
import torch

from llmray.model import llama
from llmray.model.config import preset
from llmray.rl.grpo import GRPO, GrpoConfig, group_advantages
from llmray.rl.rollout import pack_rows
from llmray.train.objectives import IGNORE_INDEX

GROUP = 3


def reference_advantages(rewards: list[float], group: int, scale: bool) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        r = rewards[start:start + group]
        mean = sum(r) / group
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (group - 1))
        out += [(x - mean) / (std + 1e-4) if scale else x - mean for x in r]
    return out


def test_group_advantages_match_the_formula():
    rewards = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.1, 0.9, 0.3]
    for scale in (True, False):
        got = group_advantages(torch.tensor(rewards), GROUP, scale).tolist()
        assert got == pytest.approx(reference_advantages(rewards, GROUP, scale), abs=1e-6)
    assert group_advantages(torch.tensor(rewards), GROUP, True)[3:6].abs().max() == 0  # equal rewards teach nothing


@pytest.fixture(scope="module")
def rollouts():
    """Fixed rollouts of a tiny model: 6 sequences (2 groups of 3), completions of different lengths,
    behaviour and reference log-probs near the model's own (so the ratio clips on some tokens)."""
    torch.manual_seed(0)
    model = llama.build(preset("tiny", vocab_size=97, max_seq_len=64))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (int(n),), generator=gen).tolist() for n in (5, 7, 4, 6, 5, 8)]
    completions = [torch.randint(3, 97, (int(n),), generator=gen).tolist() for n in (3, 9, 1, 6, 4, 7)]
    inputs, targets = pack_rows(prompts, completions)
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs).float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    mask = targets != IGNORE_INDEX
    old = torch.where(mask, logp + 0.3 * torch.randn(logp.shape, generator=gen), torch.zeros(()))
    ref = torch.where(mask, logp + 0.2 * torch.randn(logp.shape, generator=gen), torch.zeros(()))
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.0, 1.1, 0.5])
    batch = {"inputs": inputs, "targets": targets, "old_logps": old, "ref_logps": ref,
             "advantages": group_advantages(rewards, GROUP, True)}
    return model, batch


def reference_loss(model, batch, cfg: GrpoConfig, max_new_tokens: int) -> torch.Tensor:
    """The objective written token by token, as the papers state it."""
    logits = model(batch["inputs"]).float()
    per_sequence, tokens = [], 0
    for i in range(logits.shape[0]):
        terms = []
        for t in range(logits.shape[1]):
            target = int(batch["targets"][i, t])
            if target == IGNORE_INDEX:
                continue
            logp = torch.log_softmax(logits[i, t], -1)[target]
            ratio = torch.exp(logp - batch["old_logps"][i, t])
            a = batch["advantages"][i]
            term = -torch.min(ratio * a, torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a)
            if cfg.kl_coef:
                q = batch["ref_logps"][i, t] - logp
                term = term + cfg.kl_coef * (torch.exp(q) - q - 1)
            terms.append(term)
        per_sequence.append(terms)
        tokens += len(terms)
    if cfg.aggregation == "token_mean":
        return sum(sum(s) for s in per_sequence) / tokens
    if cfg.aggregation == "sequence_mean":
        return sum(sum(s) / len(s) for s in per_sequence) / len(per_sequence)
    return sum(sum(s) for s in per_sequence) / (len(per_sequence) * max_new_tokens)


def _loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_loss_and_gradients_equal_the_reference(rollouts, aggregation, kl_coef):
    model, batch = rollouts
    cfg = GrpoConfig(clip_low=0.2, clip_high=0.28, kl_coef=kl_coef, aggregation=aggregation)
    objective = GRPO(cfg, max_new_tokens=10)
    out = objective.loss(model, batch)
    got, got_grads = _loss_and_grads(model, out.loss_sum / out.weight)
    want, want_grads = _loss_and_grads(model, reference_loss(model, batch, cfg, 10))
    assert got == pytest.approx(want, abs=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)

    # split in two micro-batches, summed and divided once (as the trainer does): the same gradient
    halves = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 2), slice(2, None))]
    outs = [objective.loss(model, half) for half in halves]
    _, split_grads = _loss_and_grads(model, sum(o.loss_sum for o in outs) / sum(o.weight for o in outs))
    for name, grad in want_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_clipping_and_kl_are_active_in_the_fixture(rollouts):
    """The fixture exercises both branches of the clipped objective and a non-zero KL (else the test above
    could pass with a broken clip)."""
    model, batch = rollouts
    mask = batch["targets"] != IGNORE_INDEX
    logp = -torch.nn.functional.cross_entropy(model(batch["inputs"]).transpose(1, 2), batch["targets"],
                                              ignore_index=IGNORE_INDEX, reduction="none")
    ratio = torch.exp(logp - batch["old_logps"])[mask]
    assert (ratio > 1.28).any() and (ratio < 0.8).any() and ((ratio > 0.8) & (ratio < 1.2)).any()

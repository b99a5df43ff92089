"""GRPO's loss and gradients against a plain per-token reference, for each aggregation variant."""

from __future__ import annotations

import math

import pytest
import torch

from llmray.model import llama
from llmray.model.config import preset
from llmray.rl.grpo import GRPO, GrpoConfig, grpo_batch, group_advantages

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


def sequence_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Per-token log-probs of ``completion`` after ``prompt``: the sequence alone, teacher-forced."""
    logits = model(torch.tensor([prompt + completion[:-1]]))[0, len(prompt) - 1:].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.fixture(scope="module")
def rollouts():
    """Fixed rollouts of a tiny model: 2 groups of 3 completions of different lengths, each group
    sharing its prompt; behaviour and reference log-probs near the model's own (so the ratio clips
    on some tokens)."""
    torch.manual_seed(0)
    model = llama.build(preset("tiny", vocab_size=97, max_seq_len=64))
    gen = torch.Generator().manual_seed(1)
    group_prompts = [torch.randint(3, 97, (int(n),), generator=gen).tolist() for n in (5, 7)]
    prompts = [group_prompts[i // GROUP] for i in range(2 * GROUP)]
    completions = [torch.randint(3, 97, (int(n),), generator=gen).tolist() for n in (3, 9, 1, 6, 4, 7)]
    with torch.no_grad():
        own = [sequence_logps(model, p, c) for p, c in zip(prompts, completions)]
    old = [logp + 0.3 * torch.randn(logp.shape, generator=gen) for logp in own]
    ref = [logp + 0.2 * torch.randn(logp.shape, generator=gen) for logp in own]
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.2, 0.0, 1.1, 0.5]), GROUP, True).tolist()
    return model, {"prompts": prompts, "completions": completions, "old": old, "ref": ref, "advantages": advantages}


def batch_of(rollouts: dict, take: slice = slice(None)) -> dict:
    return grpo_batch(*(rollouts[k][take] for k in ("prompts", "completions", "old", "ref", "advantages")),
                      max_row_tokens=64)


def reference_loss(model, rollouts: dict, cfg: GrpoConfig, max_new_tokens: int) -> torch.Tensor:
    """The objective written token by token, as the papers state it, each sequence run alone."""
    per_sequence, tokens = [], 0
    for prompt, completion, old, ref, a in zip(*(rollouts[k] for k in ("prompts", "completions", "old", "ref",
                                                                        "advantages"))):
        terms = []
        for t, logp in enumerate(sequence_logps(model, prompt, completion)):
            ratio = torch.exp(logp - old[t])
            term = -torch.min(ratio * a, torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a)
            if cfg.kl_coef:
                q = ref[t] - logp
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
    model, data = rollouts
    cfg = GrpoConfig(clip_low=0.2, clip_high=0.28, kl_coef=kl_coef, aggregation=aggregation)
    objective = GRPO(cfg, max_new_tokens=10)
    batch = batch_of(data)
    assert batch["tokens"].shape[0] == 2  # one row per group: each prompt computed once
    out = objective.loss(model, batch)
    got, got_grads = _loss_and_grads(model, out.loss_sum / out.weight)
    want, want_grads = _loss_and_grads(model, reference_loss(model, data, cfg, 10))
    assert got == pytest.approx(want, abs=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)

    # split in two micro-batches (one cuts a group), summed and divided once (as the trainer does)
    outs = [objective.loss(model, batch_of(data, s)) for s in (slice(0, 2), slice(2, None))]
    _, split_grads = _loss_and_grads(model, sum(o.loss_sum for o in outs) / sum(o.weight for o in outs))
    for name, grad in want_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_clipping_and_kl_are_active_in_the_fixture(rollouts):
    """The fixture exercises both branches of the clipped objective and a non-zero KL (else the test above
    could pass with a broken clip)."""
    model, data = rollouts
    with torch.no_grad():
        logp = torch.cat([sequence_logps(model, p, c) for p, c in zip(data["prompts"], data["completions"])])
    ratio = torch.exp(logp - torch.cat(data["old"]))
    assert (ratio > 1.28).any() and (ratio < 0.8).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    assert (torch.cat(data["ref"]) - logp).abs().min() > 0

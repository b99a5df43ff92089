"""DPO / conservative DPO / IPO losses against hand computation; the objective on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmray.align.pairs import PairRows
from llmray.train.objectives import DPO, dpo_loss, sequence_logps


def test_losses_and_rewards_match_a_hand_computation():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    beta = 0.1
    # h = (-10 - -11) - (-12 - -11) = 2; β·h = 0.2
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.2)))  # −log σ(0.2) = 0.598139
    assert losses.item() == pytest.approx(0.5981388693)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2)))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, ipo=True)
    assert ipo.item() == pytest.approx((2 - 1 / (2 * beta)) ** 2)  # (2 − 5)² = 9


def test_gradient_pushes_chosen_up_and_rejected_down():
    policy = torch.tensor([-10.0, -12.0], requires_grad=True)
    losses, _, _ = dpo_loss(policy[:1], policy[1:], torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.5)
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]


class Lookup(torch.nn.Module):
    """A 'model' whose next-token logits depend only on the current token: log-probs are easy by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, tokens, segment_ids=None):
        return self.table[tokens]


def test_objective_scores_only_completions_and_ignores_padding_pairs():
    vocab = 8
    model = Lookup(vocab)
    # two pairs; sequences: 2 chosen then 2 rejected, right-padded with 0
    tokens = np.array([[1, 2, 3, 4, 0], [1, 5, 6, 0, 0], [1, 2, 3, 7, 7], [1, 5, 2, 0, 0]])
    completion = np.array([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=bool)
    rows = PairRows(tokens, completion, np.array([4, 3, 5, 3]), ["a", "b"])
    logp = torch.log_softmax(model.table.detach(), dim=-1)
    by_hand = [logp[2, 3] + logp[3, 4], logp[5, 6], logp[2, 3] + logp[3, 7] + logp[7, 7], logp[5, 2]]
    got = sequence_logps(model, *(torch.from_numpy(rows.sequences([0, 1, 2, 3])[k]) for k in ("inputs", "targets")))
    torch.testing.assert_close(got, torch.stack(by_hand))

    rows.reference_logps = got.detach().double().numpy() - np.array([0.5, 0.0, -0.5, 0.0])
    objective = DPO(beta=0.2)
    batch = {k: torch.from_numpy(v) for k, v in rows.batch([0, -1]).items()}  # pair 0 and an empty pair
    out = objective.loss(model, batch)
    assert out.weight == 1 == objective.weight(batch)
    assert out.loss_sum.item() == pytest.approx(math.log(1 + math.exp(-0.2 * 1.0)), rel=1e-5)  # h = 0.5 + 0.5
    terms = objective.pair_terms(model, batch)
    assert terms["chosen_reward"].tolist() == pytest.approx([0.1, 0.0])  # the empty pair counts as 0
    assert terms["rejected_reward"].tolist() == pytest.approx([-0.1, 0.0])
    assert terms["chosen_logp"][0].item() == pytest.approx(by_hand[0].item(), rel=1e-6)


def test_policy_equal_to_reference_gives_log_2():
    model = Lookup(8)
    tokens = np.array([[1, 2, 3], [1, 2, 4]])
    rows = PairRows(tokens, np.array([[0, 1, 1], [0, 1, 1]], dtype=bool), np.array([3, 3]), ["a"])
    seq = rows.sequences([0, 1])
    rows.reference_logps = sequence_logps(model, torch.from_numpy(seq["inputs"]),
                                          torch.from_numpy(seq["targets"])).double().detach().numpy()
    out = DPO(beta=0.1).loss(model, {k: torch.from_numpy(v) for k, v in rows.batch([0]).items()})
    assert out.loss_sum.item() == pytest.approx(math.log(2))

"""Muon: the update of one matrix against a direct float64 Newton–Schulz reference, the AdamW groups
against torch's AdamW, which parameters go where, bitwise continuation from a saved state, and the
refusal under DeepSpeed."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from llmray.model import llama
from llmray.model.config import ModelConfig
from llmray.train import muon
from llmray.train.trainer import OptimizerConfig, optimizer_factory, parameter_groups

TINY = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=48, max_seq_len=16)


def reference_newton_schulz(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration written out in float64 (the published coefficients, no shortcuts)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.double()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if transposed else x


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20)])
def test_two_steps_on_one_matrix_equal_the_direct_reference(shape):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(shape))
    grads = [torch.randn(shape), torch.randn(shape)]
    lr, momentum, decay = 0.02, 0.95, 0.1
    optimizer = muon.Muon([{"params": [weight], "muon": True, "lr": lr, "weight_decay": decay,
                            "momentum": momentum, "nesterov": True, "ns_steps": 5}])
    expected = weight.detach().double().clone()
    buffer = torch.zeros(shape, dtype=torch.float64)
    scale = math.sqrt(max(1.0, shape[0] / shape[1]))
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
        buffer = momentum * buffer + (1 - momentum) * grad.double()
        nesterov = (1 - momentum) * grad.double() + momentum * buffer
        expected = expected * (1 - lr * decay) - lr * scale * reference_newton_schulz(nesterov, 5)
    assert torch.allclose(weight.detach().double(), expected, atol=1e-5, rtol=0)


def test_the_iteration_makes_singular_values_near_one():
    """Not an identity or a no-op: the result's singular values lie in the quintic's band (~0.7-1.2)."""
    torch.manual_seed(1)
    matrix = torch.randn(32, 8) @ torch.diag(torch.logspace(-2, 0, 8))  # singular values spread 100x
    singular_values = torch.linalg.svdvals(muon.newton_schulz(matrix, 5))
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    assert torch.linalg.svdvals(matrix).max() / torch.linalg.svdvals(matrix).min() > 20


def test_hidden_matrices_get_muon_and_the_rest_adamw():
    model = llama.build(TINY)
    cfg = OptimizerConfig(kind="muon", lr=1e-3)
    groups = parameter_groups(model, cfg)
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in groups if g["muon"] for p in g["params"]}
    adamw_names = {names[id(p)] for g in groups if not g["muon"] for p in g["params"]}
    assert muon_names and all(n.startswith("layers.") and n.endswith("weight") and "norm" not in n
                              for n in muon_names)
    assert {"tok_embeddings.weight", "output.weight"} <= adamw_names
    assert all("norm" in n or not n.startswith("layers.") for n in adamw_names)
    assert muon_names | adamw_names == set(names.values())
    assert [g["lr"] for g in groups] == [cfg.muon.lr, 1e-3, 1e-3]


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    twin = copy.deepcopy(model)
    ours = muon.Muon([{"params": list(model.parameters()), "muon": False, "lr": 1e-2, "weight_decay": 0.1,
                       "betas": (0.9, 0.95), "eps": 1e-8}])
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(5):
        x = torch.randn(16, 8)
        for net, optimizer in ((model, ours), (twin, reference)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(mine, theirs, atol=1e-7, rtol=1e-6)


def train(model, optimizer, batches):
    losses = []
    for tokens in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_restored_state_continues_bit_for_bit():
    torch.manual_seed(0)
    batches = [torch.randint(0, 64, (4, 12)) for _ in range(6)]
    make = optimizer_factory(OptimizerConfig(kind="muon", lr=3e-3), torch.device("cpu"))
    model = llama.build(TINY)
    start = copy.deepcopy(model.state_dict())
    straight_optimizer = make(model)
    straight = train(model, straight_optimizer, batches)

    model = llama.build(TINY)
    model.load_state_dict(start)
    first = make(model)
    train(model, first, batches[:3])
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(first.state_dict())
    assert any("momentum_buffer" in s for s in saved_optimizer["state"].values())
    resumed_model = llama.build(TINY)
    resumed_model.load_state_dict(saved_model)
    resumed = make(resumed_model)
    resumed.load_state_dict(saved_optimizer)
    assert train(resumed_model, resumed, batches[3:]) == straight[3:]


def test_muon_lowers_the_loss_of_a_tiny_model():
    torch.manual_seed(0)
    batch = torch.randint(0, 64, (8, 12))
    model = llama.build(TINY)
    losses = train(model, optimizer_factory(OptimizerConfig(kind="muon", lr=3e-3), torch.device("cpu"))(model),
                   [batch] * 20)
    assert losses[-1] < 0.6 * losses[0]


def test_deepspeed_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="parallel.strategy=fsdp2"):
        muon.check_supported("deepspeed")
    muon.check_supported("fsdp2")
    muon.check_supported("none")


def test_adamw_lr_follows_width_and_muon_lr_does_not():
    """lr_width_reference: an AdamW lr tuned at width 128 is halved at 4x the width, doubled at 1/4."""
    narrow, wide = llama.build(TINY), llama.build(dataclasses.replace(TINY, dim=512, ffn_hidden_dim=None))
    cfg = OptimizerConfig(kind="muon", lr=1e-3, lr_width_reference=128)
    for model, expected in ((narrow, 2e-3), (wide, 5e-4)):
        groups = parameter_groups(model, cfg)
        assert [g["lr"] for g in groups] == pytest.approx([cfg.muon.lr, expected, expected])
    assert parameter_groups(wide, OptimizerConfig(lr=1e-3))[0]["lr"] == 1e-3

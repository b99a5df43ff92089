"""The fused, chunked head + cross-entropy equals the full-logits loss, and never holds the full logits.

Reference: ``F.cross_entropy`` on the full fp32 logits (``cross_entropy_sum``), with ignored
targets, the z-loss, tied embeddings, and chunk sizes that do not divide the token count.
Tolerance 1e-6 relative (fp32; only the summation order differs), in the L2 norm for gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmray.model import linear_cross_entropy as lce
from llmray.model import llama
from llmray.model.config import preset
from llmray.train.objectives import CausalLM, MaskedLM

RTOL = 1e-6


def problem(tokens: int = 300, dim: int = 48, vocab: int = 1000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.3).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[::7] = lce.IGNORE_INDEX
    return hidden, weight, targets


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Relative error in the L2 norm: fp32 rounding of either side alone is ~1e-7 of it."""
    return bool((a - b).norm() / b.norm() < RTOL)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("chunk", [64, 77, 1024])
def test_loss_and_gradients_equal_the_full_logits_reference(z_loss, chunk):
    hidden, weight, targets = problem()
    reference = lce.cross_entropy_sum(hidden @ weight.T, targets, z_loss)
    ref_grads = torch.autograd.grad(reference * 0.37, (hidden, weight))
    fused = lce.linear_cross_entropy(hidden, weight, targets, z_loss, chunk_tokens=chunk)
    grads = torch.autograd.grad(fused * 0.37, (hidden, weight))
    assert abs(float(fused.detach()) - float(reference.detach())) / float(reference.detach()) < RTOL
    assert close(grads[0], ref_grads[0]) and close(grads[1], ref_grads[1])
    assert float(grads[0][::7].abs().max()) == 0.0  # ignored targets send no gradient


def test_the_model_forward_with_targets_equals_its_logits_loss_with_tied_embeddings_and_packing():
    torch.manual_seed(0)
    model = llama.build(preset("tiny", vocab_size=300, max_seq_len=64))
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, 300, (3, 41))
    segments = (torch.arange(40) >= 15).long().expand(3, 40)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].clone(), "segment_ids": segments}
    batch["targets"][:, :5] = lce.IGNORE_INDEX
    for objective, batch_ in [(CausalLM(z_loss=1e-4), tokens), (MaskedLM(), batch)]:
        fused = objective.loss(model, batch_).loss_sum
        fused_grads = torch.autograd.grad(fused, list(model.parameters()))
        if isinstance(objective, CausalLM):
            inputs, targets = objective.inputs_and_targets(tokens)
            reference = objective.pipeline_loss(model(inputs), targets)
        else:
            reference = lce.cross_entropy_sum(model(batch["inputs"], segment_ids=segments), batch["targets"])
        ref_grads = torch.autograd.grad(reference, list(model.parameters()))
        fused, reference = float(fused.detach()), float(reference.detach())
        assert abs(fused - reference) / reference < RTOL
        assert all(close(a, b) for a, b in zip(fused_grads, ref_grads, strict=True))


PEAK_OF_ONE_STEP = """
import torch
from llmray.model import linear_cross_entropy as lce
from llmray.process_memory import peak_resident_mb

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(256, 1024, generator=gen).requires_grad_()
weight = torch.randn(32000, 1024, generator=gen).mul_(0.03).requires_grad_()
targets = torch.randint(0, 32000, (256,), generator=gen)
before = peak_resident_mb()
(lce.linear_cross_entropy(hidden, weight, targets, chunk_tokens=64) * 0.5).backward()
print((peak_resident_mb() - before) * 2 ** 20 / (weight.numel() * 4))
"""


def test_forward_and_backward_hold_one_weight_sized_gradient():
    """Peak memory of a step, in weights' worth, from a fresh process whose freed buffers go back to
    the system at once: the head's gradient (1) plus a few chunks of logits (~0.2). A weight-sized
    temporary per chunk, or a scaled copy in backward, would put it above 2."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peak = float(subprocess.run([sys.executable, "-c", PEAK_OF_ONE_STEP], env=env, check=True, capture_output=True,
                                text=True).stdout)
    assert 1.0 <= peak < 1.5


def test_no_grad_computes_only_the_loss():
    hidden, weight, targets = problem()
    with torch.no_grad():
        loss = lce.linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    assert abs(float(loss) - float(lce.cross_entropy_sum(hidden @ weight.T, targets))) / float(loss) < RTOL


def test_under_bf16_autocast_the_head_runs_in_bf16_and_tracks_the_fp32_loss():
    hidden, weight, targets = problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lce.linear_cross_entropy(hidden, weight, targets, chunk_tokens=64)
        reference = lce.cross_entropy_sum(hidden @ weight.T, targets)  # the plain path under autocast
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32
    assert abs(float(loss) - float(reference)) / float(reference) < 1e-3
    exact = lce.cross_entropy_sum(hidden @ weight.T, targets)
    assert abs(float(loss) - float(exact)) > 0  # the GEMM really ran in bf16


def vocab_parallel_ranks(out):
    """Each of 2 ranks holds rows [offset, offset + n) of a 1001-row head (uneven split)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    hidden, weight, targets = problem(vocab=1001)
    rows = [501, 500]
    offset = sum(rows[:rank])
    mine = weight.detach()[offset:offset + rows[rank]].clone().requires_grad_()
    loss = lce.linear_cross_entropy(hidden, mine, targets, 1e-3, chunk_tokens=77, vocab_group=dist.group.WORLD,
                                    vocab_offset=offset)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, mine))
    torch.save({"loss": loss.detach(), "grad_hidden": grad_hidden, "grad_weight": grad_weight},
               out / f"rank{rank}.pt")


def test_vocabulary_parallel_on_two_ranks_equals_the_full_reference(tmp_path):
    from tests.train_support import spawn_gloo

    spawn_gloo(2, vocab_parallel_ranks, tmp_path)
    hidden, weight, targets = problem(vocab=1001)
    reference = lce.cross_entropy_sum(hidden @ weight.T, targets, 1e-3)
    ref_hidden, ref_weight = torch.autograd.grad(reference, (hidden, weight))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:  # every rank gets the whole loss and the whole hidden-state gradient
        assert abs(float(result["loss"]) - float(reference.detach())) / float(reference.detach()) < RTOL
        assert close(result["grad_hidden"], ref_hidden)
    assert close(torch.cat([r["grad_weight"] for r in ranks]), ref_weight)

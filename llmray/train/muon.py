"""Muon for the hidden weight matrices, AdamW for everything else, in one torch optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") replaces
each 2-D weight's momentum update by its nearest semi-orthogonal matrix, computed with a quintic
Newton–Schulz iteration: every direction of the update moves at a similar rate, which trains a
Transformer's hidden matrices in fewer tokens than AdamW. Embeddings, the output head, norms and
biases are not hidden matrices and keep AdamW.

Design choices:

* One optimizer with two kinds of parameter group (``group["muon"]``), so the engines (one
  process, FSDP2, TP, each pipeline stage) keep "one optimizer per model part", the learning-rate
  schedule drives both kinds, and DCP checkpoints hold both states (Muon: ``momentum_buffer``;
  AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``) keyed by parameter name, resharded like any other.
* Shape-based learning-rate scaling: a ``rows × cols`` matrix moves ``lr · sqrt(max(1, rows /
  cols))`` (as in the reference implementation), so tall matrices (MLP down-projections,
  grouped-query K/V with fewer rows) are not under-updated.
* Sharded parameters (FSDP2 ``Shard(0)``, TP ``Shard(0|1)``, HSDP, their 2-D meshes) are
  orthogonalized as **whole matrices**: the update is gathered (``full_tensor``), every rank runs
  the same iteration on it, and keeps its own shard (a local slice, no communication). This costs
  one all-gather of each matrix's update per step and replicated Newton–Schulz compute, and gives
  the single-process result exactly up to reduction order. Orthogonalizing each shard alone would
  be a different optimizer whose result depends on the world size; we do not do that.
* Newton–Schulz runs in bf16 on CUDA (its usual setting: the iteration is self-correcting) and
  in fp32 on CPU (CPU bf16 matmuls are slower there, and the tests compare with a reference).
* DeepSpeed ZeRO flattens and partitions parameters inside its optimizer wrapper, so Muon would
  see slices of flat buffers, not matrices: that combination is refused with a clear message
  (:func:`check_supported`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from llmray.config import param

# coefficients of the quintic iteration from the reference implementation: they maximise the
# slope at zero (fast growth of small singular values) at the cost of converging to ~[0.7, 1.2]
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@dataclass
class MuonConfig:
    """Muon's settings (used when ``optimizer.kind`` is ``muon``)."""

    lr: float = param(0.02, doc="peak learning rate of the Muon (hidden-matrix) groups; the schedule "
                                "scales it like the AdamW lr", min=0.0)
    momentum: float = param(0.95, doc="momentum of the update before orthogonalization", min=0.0, max=1.0)
    nesterov: bool = param(True, doc="orthogonalize the Nesterov look-ahead rather than the buffer")
    ns_steps: int = param(5, doc="Newton–Schulz iterations", min=1)
    weight_decay: float = param(0.0, doc="decoupled weight decay of the Muon groups", min=0.0)
    params: list[str] = param(default_factory=lambda: ["layers."],
                              doc="2-D parameters whose name contains any of these use Muon "
                                  "(default: the Transformer blocks' matrices); all others use AdamW")


def newton_schulz(update: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the singular vectors of ``update`` (2-D)."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(update.dtype)


def shape_scale(rows: int, cols: int) -> float:
    return math.sqrt(max(1.0, rows / cols))


def orthogonalized(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Newton–Schulz of the whole matrix, returned with ``update``'s sharding (DTensor or not)."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps, dtype)
    whole = newton_schulz(update.full_tensor(), steps, dtype)
    mesh = update.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, update.placements)


class Muon(torch.optim.Optimizer):
    """Muon on groups with ``muon=True``, AdamW (decoupled weight decay, bias-corrected) on the rest.

    Every group carries its own ``lr`` and ``weight_decay``; Muon groups also ``momentum``,
    ``nesterov``, ``ns_steps``; AdamW groups ``betas`` and ``eps``.
    """

    def __init__(self, groups: list[dict], ns_dtype: torch.dtype = torch.float32):
        super().__init__(groups, defaults={})
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["muon"]:
                    self._muon_update(p, group)
                else:
                    self._adamw_update(p, group)

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buffer = state["momentum_buffer"]
        momentum = group["momentum"]
        buffer.lerp_(p.grad, 1 - momentum)
        update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        direction = orthogonalized(update, group["ns_steps"], self.ns_dtype)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"] * shape_scale(*p.shape))

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1 ** step))


def uses_muon(name: str, p: nn.Parameter, cfg: MuonConfig) -> bool:
    return p.ndim == 2 and any(pattern in name for pattern in cfg.params)


def check_supported(strategy: str) -> None:
    if strategy == "deepspeed":
        raise ValueError("optimizer.kind=muon does not run under parallel.strategy=deepspeed: ZeRO flattens and "
                         "partitions parameters inside its optimizer, so Muon would orthogonalize slices of flat "
                         "buffers instead of weight matrices. Use parallel.strategy=fsdp2 (same memory savings "
                         "as ZeRO-3) or optimizer.kind=adamw")

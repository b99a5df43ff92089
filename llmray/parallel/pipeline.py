"""Pipeline parallelism: split the plain model into stages by layer and run a schedule over them.

* **Split** (:func:`split_layers`): contiguous runs of layers, either as a config list
  (``layers_per_stage``) or balanced so that the largest stage holds the fewest parameters —
  the embedding counts toward the first stage and the final norm + head toward the last, which
  is what makes the balanced split differ from an even one when the vocabulary is large.
  An exact min-max partition (a small dynamic program), not a greedy guess.
* **Stages** (:func:`stage_modules`): a stage is a :class:`~llmray.model.llama.Transformer`
  shell that *shares* the owned submodules of the full model (nothing is copied) and has
  ``tok_embeddings`` / ``norm`` / ``output`` set to ``None`` where it does not own them. Layer
  names are kept (``layers.5.…``), so each stage's state dict is a slice of the full model's
  under the same global names, and a checkpoint written with pp=2 loads with pp=1 (and back).
  Tied embeddings would need a gradient all-reduce between the first and the last stage; that
  is refused with a clear error rather than silently untied.
* **Placement**: with ``v`` virtual stages per rank, stage ``s`` runs on pipeline rank
  ``s mod pp`` (the looped layout that Interleaved 1F1B and interleaved zero-bubble expect).
* **Schedules**: ``torch.distributed.pipelining`` GPipe, 1F1B, Interleaved 1F1B and
  Interleaved Zero Bubble (ZB1P, backward split into input- and weight-gradients), all of which
  run on gloo. Gradients are not averaged over micro-batches by the schedule
  (``scale_grads=False``): the loss function returns the *summed* loss × the trainer's global
  scale, so a pipelined step computes the same gradient as one process.
* **Loss and metrics**: only the last stage sees logits; :meth:`PipelineEngine.forward_backward`
  all-reduces the summed loss over the pipeline group (other stages contribute 0), and the
  gradient norm is the square root of the squared norms summed over every stage.
* **Checkpoints**: model and optimizer state dicts of all local stages are merged under global
  names by :mod:`~llmray.parallel.state` (the same format as one whole model), so DCP reshards
  them on load to any pp/dp/tp layout.

Apply this first; each stage module then gets TP → activation checkpointing → compile → FSDP.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from llmray.config import param
from llmray.model.config import ModelConfig
from llmray.model.llama import Transformer
from llmray.parallel import state

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble")
MULTI_STAGE = ("interleaved_1f1b", "interleaved_zero_bubble")


@dataclass
class PipelineScheduleConfig:
    """How the layers are split into pipeline stages and which schedule runs them (parallel.pp > 1)."""

    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble"] = param(
        "1f1b", doc="gpipe: all forwards then all backwards; 1f1b: one forward one backward (less "
                    "activation memory); interleaved_1f1b / interleaved_zero_bubble: several stages per "
                    "rank (virtual_stages >= 2), smaller bubble")
    microbatches: int = param(4, doc="pipeline micro-batches each micro-batch of the trainer is cut into "
                                     "(must divide its batch size)", min=1)
    virtual_stages: int = param(1, doc="stages per pipeline rank (interleaved schedules need >= 2)", min=1)
    layers_per_stage: list[int] | None = param(
        None, doc="layers in each of the pp × virtual_stages stages, in order; null = balanced by parameters")

    def __post_init__(self) -> None:
        if self.schedule in MULTI_STAGE and self.virtual_stages < 2:
            raise ValueError(f"pipeline.schedule={self.schedule} needs pipeline.virtual_stages >= 2")
        if self.schedule not in MULTI_STAGE and self.virtual_stages != 1:
            raise ValueError(f"pipeline.schedule={self.schedule} runs one stage per rank; "
                             f"virtual_stages={self.virtual_stages} needs an interleaved schedule")


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------

def split_layers(cfg: ModelConfig, num_stages: int, layers_per_stage: list[int] | None = None) -> list[list[str]]:
    """Layer names of each stage: the config list, or the split minimizing the largest stage's parameters."""
    n = cfg.n_layers
    if num_stages > n:
        raise ValueError(f"{num_stages} pipeline stages but only {n} layers")
    if layers_per_stage is not None:
        if len(layers_per_stage) != num_stages or sum(layers_per_stage) != n or min(layers_per_stage) < 1:
            raise ValueError(f"pipeline.layers_per_stage={layers_per_stage} must list {num_stages} positive "
                             f"counts summing to the model's {n} layers")
        counts = list(layers_per_stage)
    else:
        counts = _balanced_counts(n, num_stages, cfg.params_per_layer(), cfg.vocab_size * cfg.dim,
                                  cfg.dim + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim))
    bounds = [0, *itertools.accumulate(counts)]
    return [[str(i) for i in range(bounds[s], bounds[s + 1])] for s in range(num_stages)]


def _balanced_counts(n_layers: int, num_stages: int, per_layer: int, first_extra: int, last_extra: int) -> list[int]:
    """Layers per stage minimizing the maximum stage cost; ties go to the most even split."""
    def cost(stage: int, layers: int) -> int:
        return layers * per_layer + (first_extra if stage == 0 else 0) + \
            (last_extra if stage == num_stages - 1 else 0)

    # best[s][k]: (max cost, spread) of putting the first k layers into stages 0..s-1
    inf = (math.inf, math.inf)
    best = [[inf] * (n_layers + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (n_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0, 0)
    for s in range(1, num_stages + 1):
        for k in range(s, n_layers - (num_stages - s) + 1):
            for take in range(1, k - (s - 1) + 1):
                prev = best[s - 1][k - take]
                if prev[0] == math.inf:
                    continue
                candidate = (max(prev[0], cost(s - 1, take)), prev[1] + take * take)
                if candidate < best[s][k]:
                    best[s][k], choice[s][k] = candidate, take
    counts, k = [], n_layers
    for s in range(num_stages, 0, -1):
        counts.append(choice[s][k])
        k -= choice[s][k]
    return counts[::-1]


def stage_indices(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stages held by pipeline rank ``pp_rank`` (looped placement: ``s mod pp``)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def stage_module(model: Transformer, layer_names: list[str], *, first: bool, last: bool) -> Transformer:
    """A Transformer holding only ``layer_names`` (and the embedding / head if first / last), sharing modules."""
    with torch.device("meta"):
        stage = Transformer(model.cfg)
    stage.layers = nn.ModuleDict({name: model.layers[name] for name in layer_names})
    stage.tok_embeddings = model.tok_embeddings if first else None
    stage.norm = model.norm if last else None
    stage.output = model.output if last else None
    return stage


def stage_modules(model: Transformer, pp_rank: int, pp: int,
                  cfg: PipelineScheduleConfig) -> list[tuple[int, Transformer]]:
    """(stage index, stage module) of every stage this pipeline rank runs."""
    if model.cfg.tie_embeddings and pp > 1:
        raise ValueError("pipeline parallelism with tie_embeddings=true is not supported (the embedding and "
                         "the head live on different stages); set model.tie_embeddings=false")
    num_stages = pp * cfg.virtual_stages
    split = split_layers(model.cfg, num_stages, cfg.layers_per_stage)
    return [(s, stage_module(model, split[s], first=s == 0, last=s == num_stages - 1))
            for s in stage_indices(pp_rank, pp, cfg.virtual_stages)]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def build_schedule(parts: list[tuple[int, nn.Module]], pp_group: dist.ProcessGroup, cfg: PipelineScheduleConfig,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device):
    """The configured ``torch.distributed.pipelining`` schedule over this rank's stage modules."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules

    num_stages = dist.get_world_size(pp_group) * cfg.virtual_stages
    stages = [PipelineStage(module, index, num_stages, device, group=pp_group) for index, module in parts]
    if cfg.schedule in MULTI_STAGE:
        cls = {"interleaved_1f1b": schedules.ScheduleInterleaved1F1B,
               "interleaved_zero_bubble": schedules.ScheduleInterleavedZeroBubble}[cfg.schedule]
        return cls(stages, n_microbatches=cfg.microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = {"gpipe": schedules.ScheduleGPipe, "1f1b": schedules.Schedule1F1B}[cfg.schedule]
    return cls(stages[0], n_microbatches=cfg.microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineEngine:
    """Drives this rank's pipeline stages: forward+backward by schedule, global grad norm, step, DCP.

    ``parts`` are the (already TP/FSDP-parallelized) stage modules of this rank; each gets its own
    optimizer from ``make_optimizer``. ``loss_fn(output, target)`` returns the summed loss of one
    pipeline micro-batch (fp32 scalar); :meth:`forward_backward` back-propagates it × ``scale``.
    """

    def __init__(self, parts: list[tuple[int, nn.Module]], make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 pp_mesh: DeviceMesh, cfg: PipelineScheduleConfig,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 device: torch.device):
        self.parts = parts
        self.modules = [module for _, module in parts]
        self.optimizers = [make_optimizer(module) for module in self.modules]
        self.pp_group = pp_mesh.get_group()
        num_stages = pp_mesh.size() * cfg.virtual_stages
        self.has_first = any(index == 0 for index, _ in parts)
        self.has_last = any(index == num_stages - 1 for index, _ in parts)
        self.device = device
        self._loss_fn = loss_fn
        self._scale = 1.0
        self.schedule = build_schedule(parts, self.pp_group, cfg, self._scaled_loss, device)

    def _scaled_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss_fn(output, target) * self._scale

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
        """One schedule step over ``inputs``/``targets`` (B, ...); returns the summed loss on every pp rank."""
        self._scale = scale
        args = (inputs.to(self.device),) if self.has_first else ()
        target = targets.to(self.device) if self.has_last else None
        losses: list[torch.Tensor] = []  # the last stage's scaled micro-batch losses
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for loss in losses:
            total += _local(loss.detach()).double()
        dist.all_reduce(total, group=self.pp_group)
        return total / scale

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor,
                 measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], width: int) -> torch.Tensor:
        """Forward only; ``measure(logits, targets)`` → ``width`` sums of one micro-batch, added up over
        micro-batches on the last stage and all-reduced over the pipeline group (same on every pp rank)."""
        totals: list[torch.Tensor] = []

        def observe(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            totals.append(measure(_local(output), target).to(torch.float64))
            return torch.zeros((), device=self.device)

        args = (inputs.to(self.device),) if self.has_first else ()
        target = targets.to(self.device) if self.has_last else None
        self._loss_fn, loss_fn = observe, self._loss_fn
        try:
            self.schedule.eval(*args, target=target, losses=[])
        finally:
            self._loss_fn = loss_fn
        total = torch.stack(totals).sum(0) if totals else torch.zeros(width, dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.pp_group)
        return total

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 gradient norm over every stage (and shard); clips to ``max_norm`` when > 0."""
        params = [p for module in self.modules for p in module.parameters()]
        grads = [p.grad for p in params if p.grad is not None]
        norm = get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        norm = _local(norm).double()
        squared = norm * norm
        dist.all_reduce(squared, group=self.pp_group)
        total = squared.sqrt()
        if max_norm > 0:
            clip_grads_with_norm_(params, max_norm, total.float())
        return float(total)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def discard_step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    # -- checkpoints: state dicts of every local stage merged under global names ----------------

    def save(self, directory: Path) -> None:
        state.save(self.modules, self.optimizers, directory)

    def load(self, directory: Path) -> None:
        state.load(self.modules, self.optimizers, directory)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

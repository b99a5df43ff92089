"""Parallelism applied from outside to a plain model, in one fixed order known by one function.

``train/`` builds the plain :class:`~llmray.model.llama.Transformer` and an optimizer factory
and asks :func:`build_engine` for an :class:`~llmray.parallel.fsdp.Engine`: the object the
training loop drives (backward, gradient norm, optimizer step, checkpoint save/load). Two data-
parallel strategies exist, chosen by ``ParallelConfig.strategy``:

* ``fsdp2`` (default): :func:`~llmray.parallel.compose.parallelize_part` applies, in this order,
  tensor parallelism → activation checkpointing → ``torch.compile`` → FSDP2 ``fully_shard`` per
  block and root (torchtitan's order), on the device mesh ``pp × dp_replicate × dp_shard × tp``
  of :mod:`~llmray.parallel.mesh` (FSDP2 × TP is the 2-D layout; pipeline stages in
  :mod:`~llmray.parallel.pipeline`);
* ``deepspeed``: ZeRO stage 1/2/3 through ``deepspeed.initialize`` (see ``deepspeed.py``);
  data-parallel only (tp = pp = 1, validated);
* ``none``: a single process, no wrapping: the reference the distributed runs are tested against.

Each strategy gets its own small config (this one), never the whole training config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from llmray.config import param
from llmray.parallel.mesh import ParallelDims
from llmray.parallel.pipeline import PipelineConfig


@dataclass
class ParallelConfig:
    """How the model is spread over the data-parallel workers."""

    strategy: Literal["fsdp2", "deepspeed", "none"] = param(
        "fsdp2", doc="fsdp2: torch FSDP2 fully_shard; deepspeed: ZeRO (see zero_stage); none: one process")
    zero_stage: int = param(1, doc="deepspeed only: ZeRO stage (1 optimizer, 2 +gradients, 3 +parameters)",
                            min=1, max=3)
    reshard_after_forward: bool = param(True, doc="fsdp2: free gathered block parameters after forward "
                                                  "(ZeRO-3-like memory) rather than keeping them for backward")
    activation_checkpointing: bool = param(False, doc="recompute each block's activations in backward")
    compile: bool = param(False, doc="torch.compile each Transformer block (cold start costs 20-30 s)")
    tp: int = param(1, doc="tensor-parallel degree (must divide n_heads and n_kv_heads); fsdp2 only", min=1)
    sequence_parallel: bool = param(False, doc="with tp > 1: keep the residual stream sharded on the sequence "
                                               "between the TP regions (norms on T/tp positions)")
    pp: int = param(1, doc="pipeline-parallel degree (pp × pipeline.virtual_stages <= n_layers); fsdp2 only",
                    min=1)
    pipeline: PipelineConfig = param(default_factory=PipelineConfig, doc="stage split and schedule (pp > 1)")
    dp_replicate: int = param(1, doc="fsdp2: replica groups of HSDP (each group shards over dp_shard ranks)",
                              min=1)
    dp_shard: int = param(-1, doc="fsdp2: ranks the parameters are sharded over; -1 = world size / "
                                  "(pp × dp_replicate × tp)", min=-1)

    def dims(self, world_size: int) -> ParallelDims:
        """The resolved mesh degrees for ``world_size`` ranks, checked against this strategy."""
        dims = ParallelDims.resolve(world_size, pp=self.pp, dp_replicate=self.dp_replicate,
                                    dp_shard=self.dp_shard, tp=self.tp)
        dims.validate_strategy(self.strategy)
        return dims


def build_engine(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 cfg: ParallelConfig, *, world_size: int, param_dtype: torch.dtype | None,
                 grad_clip: float = 0.0):
    """Parallelize ``model`` per ``cfg`` and return the engine the training loop drives."""
    from llmray.parallel import compose, fsdp

    dims = cfg.dims(world_size)
    shape = getattr(model, "cfg", None)
    if shape is not None:
        dims.validate_model(shape.n_layers, shape.n_heads, shape.n_kv_heads,
                            virtual_stages=cfg.pipeline.virtual_stages)
    if dims.pp_enabled:
        raise ValueError("parallel.pp > 1 runs through llmray.parallel.pipeline.PipelineEngine; the training "
                         "loop does not drive pipeline schedules yet (use tp / dp_shard / dp_replicate)")
    distributed = world_size > 1 and cfg.strategy == "fsdp2"
    mesh = dims.build_mesh(next(model.parameters()).device.type) if distributed else None
    layout = compose.Layout(dims, mesh, sequence_parallel=cfg.sequence_parallel,
                            activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                            fsdp=cfg.strategy == "fsdp2", reshard_after_forward=cfg.reshard_after_forward)
    if cfg.strategy == "deepspeed":
        from llmray.parallel import deepspeed

        compose.parallelize_part(model, layout, param_dtype=None)  # checkpointing / compile only
        return deepspeed.DeepSpeedEngine(model, make_optimizer, cfg.zero_stage, world_size=world_size,
                                         bf16=param_dtype == torch.bfloat16, grad_clip=grad_clip)
    compose.parallelize_part(model, layout, param_dtype=param_dtype)
    return fsdp.TorchEngine(model, make_optimizer(model), world_size=dims.dp)

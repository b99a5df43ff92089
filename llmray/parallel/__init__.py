"""Parallelism applied from outside to a plain model, in one fixed order known by one function.

``train/`` builds the plain :class:`~llmray.model.llama.Transformer` and an optimizer factory
and asks :func:`build_engine` for an :class:`~llmray.parallel.fsdp.TorchEngine`: the object the
training loop drives (backward, gradient norm, optimizer step, checkpoint save/load). Two data-
parallel strategies exist, chosen by ``ParallelConfig.strategy``:

* ``fsdp2`` (default): :func:`~llmray.parallel.compose.parallelize_part` applies, in this order,
  tensor parallelism → activation checkpointing → ``torch.compile`` → FSDP2 ``fully_shard`` per
  block and root (torchtitan's order), on the device mesh ``pp × dp_replicate × dp_shard × tp``
  of :mod:`~llmray.parallel.mesh` (FSDP2 × TP is the 2-D layout). With ``pp > 1`` the model is
  first split into this rank's pipeline stages (:mod:`~llmray.parallel.pipeline`), each stage is
  parallelized the same way, and the engine is a ``PipelineEngine`` that runs the schedule;
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
from llmray.parallel.pipeline import PipelineScheduleConfig


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
    pipeline: PipelineScheduleConfig = param(default_factory=PipelineScheduleConfig,
                                             doc="stage split and schedule (pp > 1)")
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

    def data_shard(self, rank: int, world_size: int) -> tuple[int, int]:
        """(shard index, shard count) of the batch rank ``rank`` reads: its data-parallel coordinate.

        Tensor- and pipeline-parallel peers hold parts of one model replica, so they must read the
        same rows; only the ``dp`` ranks read different slices.
        """
        dims = self.dims(world_size)
        return dims.coordinates(rank)["dp"], dims.dp


def casts_parameters(cfg: ParallelConfig, world_size: int) -> bool:
    """Whether the layout itself runs the forward in the compute dtype: FSDP2's ``MixedPrecisionPolicy``
    where FSDP2 shards over dp > 1 ranks, and DeepSpeed's bf16 mode. Everywhere else (one process,
    FSDP2 with dp = 1, TP-only, PP-only) the trainer wraps the forward in ``torch.autocast``."""
    if cfg.strategy == "deepspeed":
        return True
    return cfg.strategy == "fsdp2" and world_size > 1 and cfg.dims(world_size).dp_enabled


def build_engine(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 cfg: ParallelConfig, *, world_size: int, param_dtype: torch.dtype | None, device: torch.device,
                 grad_clip: float = 0.0, pipeline_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 materialize: Callable[..., None] | None = None):
    """Parallelize ``model`` per ``cfg`` and return the engine the training loop drives.

    ``pipeline_loss(logits, targets)`` (the summed loss of one pipeline micro-batch) is needed
    when ``cfg.pp > 1``: only the last stage sees logits, so the objective is handed to the
    schedule rather than called on the model. ``materialize(part)`` is given for a model on
    ``meta``: it allocates and initializes what this rank holds of each part once it is split and
    sharded, before any optimizer sees it (sharded initialization). Under ZeRO-3 each module is
    partitioned as soon as it is materialized; ZeRO-1/2, which keep whole parameters on every
    rank, get the whole model materialized before ``deepspeed.initialize``.
    """
    from llmray.parallel import compose, fsdp

    materialize = materialize or (lambda part, **_: None)
    dims = cfg.dims(world_size)
    shape = getattr(model, "cfg", None)
    if shape is not None:
        dims.validate_model(shape.n_layers, shape.n_heads, shape.n_kv_heads,
                            virtual_stages=cfg.pipeline.virtual_stages)
    if dims.pp_enabled and pipeline_loss is None:
        raise ValueError("parallel.pp > 1 needs an objective that can run as a pipeline loss (causal-LM "
                         "pretraining); SFT and DPO run with parallel.tp / dp_shard / dp_replicate")
    distributed = world_size > 1 and cfg.strategy == "fsdp2"
    mesh = dims.build_mesh(device.type) if distributed else None
    layout = compose.Layout(dims, mesh, sequence_parallel=cfg.sequence_parallel,
                            activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                            fsdp=cfg.strategy == "fsdp2", reshard_after_forward=cfg.reshard_after_forward)
    if cfg.strategy == "deepspeed":
        from llmray.parallel import deepspeed

        bf16, hidden = param_dtype == torch.bfloat16, deepspeed.model_width(model)
        compose.parallelize_part(model, layout, param_dtype=None)  # checkpointing / compile only
        materialize(model, **({"each": deepspeed.partitioner(bf16, hidden)} if cfg.zero_stage == 3 else {}))
        return deepspeed.DeepSpeedEngine(model, make_optimizer, cfg.zero_stage, world_size=world_size,
                                         bf16=bf16, hidden=hidden, grad_clip=grad_clip)
    if dims.pp_enabled:
        return _pipeline_engine(model, make_optimizer, cfg, layout, param_dtype, pipeline_loss, device, materialize)
    compose.parallelize_part(model, layout, param_dtype=param_dtype)
    materialize(model)
    return fsdp.TorchEngine(model, make_optimizer(model), world_size=dims.dp)


def _pipeline_engine(model: nn.Module, make_optimizer, cfg: ParallelConfig, layout, param_dtype, pipeline_loss,
                     device: torch.device, materialize: Callable[..., None]):
    """Split ``model`` into this rank's stages, parallelize each like a whole model, schedule them.

    Only the stages' modules are materialized: on a ``meta`` model the other stages' layers never
    take memory on this rank."""
    from llmray.parallel import compose
    from llmray.parallel.pipeline import PipelineEngine, stage_modules

    parts = stage_modules(model, layout.mesh["pp"].get_local_rank(), layout.dims.pp, cfg.pipeline)
    for _, module in parts:
        compose.parallelize_part(module, layout, param_dtype=param_dtype)
        materialize(module)
    return PipelineEngine(parts, make_optimizer, layout.mesh["pp"], cfg.pipeline, pipeline_loss, device)

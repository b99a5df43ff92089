"""Parallelism applied from outside to a plain model, in one fixed order known by one function.

``train/`` builds the plain :class:`~llmray.model.llama.Transformer` and an optimizer factory
and asks :func:`build_engine` for an :class:`~llmray.parallel.fsdp.Engine`: the object the
training loop drives (backward, gradient norm, optimizer step, checkpoint save/load). Two data-
parallel strategies exist, chosen by ``ParallelConfig.strategy``:

* ``fsdp2`` (default): :func:`parallelize` applies, in this order, activation checkpointing →
  ``torch.compile`` → FSDP2 ``fully_shard`` per block and root (torchtitan's order; tensor and
  pipeline parallelism slot in before activation checkpointing when they land);
* ``deepspeed``: ZeRO stage 1/2/3 through ``deepspeed.initialize`` (see ``deepspeed.py``);
* ``none``: a single process, no wrapping: the reference the distributed runs are tested against.

Each strategy gets its own small config (this one), never the whole training config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from llmray.config import param


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


def parallelize(model: nn.Module, cfg: ParallelConfig, *, distributed: bool,
                param_dtype: torch.dtype | None) -> nn.Module:
    """Apply activation checkpointing → compile → FSDP2 to ``model`` in place; the one place that knows the order."""
    from llmray.parallel import fsdp

    if cfg.activation_checkpointing:
        fsdp.apply_activation_checkpointing(model)
    if cfg.compile:
        fsdp.apply_compile(model)
    if distributed and cfg.strategy == "fsdp2":
        fsdp.apply_fsdp(model, param_dtype=param_dtype, reshard_after_forward=cfg.reshard_after_forward)
    return model


def build_engine(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 cfg: ParallelConfig, *, world_size: int, param_dtype: torch.dtype | None):
    """Parallelize ``model`` per ``cfg`` and return the engine the training loop drives."""
    from llmray.parallel import fsdp

    if cfg.strategy == "deepspeed":
        from llmray.parallel import deepspeed

        if cfg.compile or cfg.activation_checkpointing:
            parallelize(model, cfg, distributed=False, param_dtype=None)
        return deepspeed.DeepSpeedEngine(model, make_optimizer, cfg.zero_stage, world_size=world_size,
                                         bf16=param_dtype == torch.bfloat16)
    if cfg.strategy == "none" and world_size > 1:
        raise ValueError(f"parallel.strategy=none runs one process, but the world size is {world_size}; "
                         "use fsdp2 or deepspeed for data parallelism")
    parallelize(model, cfg, distributed=world_size > 1, param_dtype=param_dtype)
    return fsdp.TorchEngine(model, make_optimizer(model), world_size=world_size)

"""The one place that knows the order: PP split, then per stage TP → activation checkpointing → compile → FSDP.

Why this order (torchtitan's): tensor parallelism must see the plain ``nn.Linear`` /
``nn.Embedding`` modules to shard them; activation checkpointing then wraps whole (already
sharded) blocks, so the recomputation includes the TP collectives; ``torch.compile`` sees the
final per-block graph; FSDP2 comes last because it shards whatever parameters exist by then —
plain tensors over the data-parallel mesh, or TP DTensors into 2-D ``(dp_shard, tp)`` DTensors.
Pipeline splitting happens before all of it, so every stage is parallelized the same way.

:class:`Layout` is the small per-run description (mesh sub-meshes and switches) the functions
here take; :func:`llmray.parallel.build_engine` derives it from the parallel config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from llmray.parallel import fsdp, tensor
from llmray.parallel.mesh import ParallelDims


@dataclass
class Layout:
    """What to apply to each model part, with the sub-meshes to apply it on."""

    dims: ParallelDims
    mesh: DeviceMesh | None  # the 4-D (pp, dp_replicate, dp_shard, tp) mesh; None in one process
    sequence_parallel: bool = False
    loss_parallel: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = True  # shard over the data-parallel ranks (False: DeepSpeed or one process)
    reshard_after_forward: bool = True

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The mesh FSDP2 shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP."""
        if self.dims.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]


def parallelize_part(module: nn.Module, layout: Layout, *, param_dtype: torch.dtype | None) -> nn.Module:
    """Apply TP → activation checkpointing → compile → FSDP2 to one model part, in place."""
    if layout.dims.tp_enabled:
        tensor.apply_tensor_parallel(module, layout.mesh["tp"], sequence_parallel=layout.sequence_parallel,
                                     loss_parallel=layout.loss_parallel)
    if layout.activation_checkpointing:
        fsdp.apply_activation_checkpointing(module)
    if layout.compile:
        fsdp.apply_compile(module)
    if layout.fsdp and layout.dims.dp_enabled:
        fsdp.apply_fsdp(module, param_dtype=param_dtype, reshard_after_forward=layout.reshard_after_forward,
                        mesh=layout.dp_mesh)
    return module

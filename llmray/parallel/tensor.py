"""Tensor parallelism (Megatron-style) and sequence parallelism as DTensor plans on the plain model.

:func:`apply_tensor_parallel` calls ``parallelize_module`` with one plan per module kind; the
model code is untouched (attention reshapes with ``view(B, T, -1, head_dim)``, so a shard sees
its local head count):

* attention: ``wq``/``wk``/``wv`` column-wise (each rank owns ``n_heads/tp`` query heads and
  ``n_kv_heads/tp`` key/value heads, so GQA groups stay whole on one rank), ``wo`` row-wise
  (one all-reduce, or reduce-scatter under SP, per attention);
* feed-forward: ``w1`` (gate) and ``w3`` (up) column-wise, ``w2`` (down) row-wise;
* token embedding vocabulary-parallel (row-wise: each rank owns ``vocab/tp`` rows, lookups of
  foreign ids give zeros, the partial sums are reduced), output head column-wise on the vocab;
  a tied head keeps the embedding's ``Shard(0)`` weight, which is exactly the column-wise layout;
* ``loss_parallel``: the head leaves logits sharded on the vocabulary (a DTensor) and
  :func:`loss_context` computes cross-entropy on the shards (no all-gather of ``B·T·V``
  logits); otherwise the head all-gathers logits and any objective works unchanged;
* ``sequence_parallel``: between the tensor-parallel regions the residual stream stays sharded
  on the sequence dimension (``Shard(1)``), so the norms run on ``T/tp`` positions and
  activations there take ``1/tp`` memory (Korthikanti et al. 2022); the row-wise outputs
  reduce-scatter instead of all-reducing and the column-wise inputs all-gather.

Parameters outside the split matmuls (the RMSNorm weights, QK-norm) become *replicated*
DTensors on the tp mesh, so every parameter lives on the same mesh: the global gradient norm,
FSDP2 on top (2-D) and DCP checkpoints treat them uniformly. A replicated weight that sees only
local heads (QK-norm) gets its gradient summed over the tp ranks by DTensor.

The model must be the plain :class:`~llmray.model.llama.Transformer` (possibly a pipeline stage
without embedding or head); apply this *before* activation checkpointing, compile and FSDP.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)


class ReplicateParallel(ParallelStyle):
    """Parameters as replicated DTensors; plain replicated tensors in and out (norms without SP)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate_params(name, mod, mesh):
            for p_name, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(p_name, nn.Parameter(
                    DTensor.from_local(param, mesh, [Replicate()], run_check=False)))

        def inputs_to_dtensor(mod, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                         if not isinstance(x, DTensor) else x for x in inputs)

        def output_to_local(mod, output, mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, replicate_params, inputs_to_dtensor, output_to_local)


def block_plan(sequence_parallel: bool, qk_norm: bool, swiglu: bool = True) -> dict[str, ParallelStyle]:
    """Plan of one TransformerBlock, keyed by submodule path."""
    residual = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    norm = SequenceParallel() if sequence_parallel else ReplicateParallel()
    plan: dict[str, ParallelStyle] = {
        "attention_norm": norm,
        # attention(x, rope, mask, cache): gather x over the sequence (SP) before the column-wise q/k/v
        "attention": PrepareModuleInput(input_layouts=(residual, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=residual, use_local_output=not sequence_parallel),
        "ffn_norm": norm,
        "feed_forward": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=residual, use_local_output=not sequence_parallel),
    }
    if not swiglu:  # GELU MLP (baseline recipe): no w3
        del plan["feed_forward.w3"]
    if qk_norm:  # per-head norm on the local heads (B, T, H/tp, D): "sharded" on dim 2
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool,
                          loss_parallel: bool) -> None:
    """Shard ``model`` (a Transformer or a pipeline stage of one) over ``tp_mesh`` in place."""
    residual = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual,
                                                use_local_output=not sequence_parallel)
    elif sequence_parallel:  # a later pipeline stage receives the full sequence: shard it
        model.register_forward_pre_hook(_shard_sequence_hook(tp_mesh))
    if model.norm is not None:
        top["norm"] = SequenceParallel() if sequence_parallel else ReplicateParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=residual,
                                        output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                        use_local_output=not loss_parallel)
    elif sequence_parallel:  # an earlier pipeline stage sends the full sequence on
        model.register_forward_hook(_gather_sequence_hook)
    parallelize_module(model, tp_mesh, top)
    plan = block_plan(sequence_parallel, qk_norm=model.cfg.qk_norm, swiglu=model.cfg.mlp == "swiglu")
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan)
    model.tie_weights()  # the head reuses the embedding's Shard(0) DTensor (same layout as column-wise)


def _shard_sequence_hook(tp_mesh: DeviceMesh):
    def hook(module, args):
        hidden, *rest = args
        return (DTensor.from_local(hidden, tp_mesh, [Replicate()], run_check=False)
                .redistribute(tp_mesh, [Shard(1)]), *rest)
    return hook


def _gather_sequence_hook(module, args, output):
    return output.redistribute(output.device_mesh, [Replicate()]).to_local()


def loss_context(enabled: bool):
    """Where the loss is computed on vocabulary-sharded logits (``loss_parallel``), else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel
    return loss_parallel()

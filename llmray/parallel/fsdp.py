"""FSDP2, activation checkpointing and compile as functions on a plain model; the torch engine.

* :func:`apply_fsdp`: ``fully_shard`` on every Transformer block, then on the root (embedding,
  final norm and head, tied or not, form the root's group). On GPU a ``MixedPrecisionPolicy``
  computes in bf16 and reduces gradients in fp32; on CPU everything stays fp32.
* :func:`apply_activation_checkpointing` wraps each block so its activations are recomputed in
  backward; parameter names gain no prefix in checkpoints (DCP's state-dict helpers strip it).
* :class:`TorchEngine` is what the training loop drives for plain torch (one process or FSDP2):
  gradient sync only on the last micro-batch of a step, the global gradient norm (a DTensor
  reduced over ranks under FSDP2), and DCP save/load of model + optimizer through
  :mod:`~llmray.parallel.state` (the layout pipeline stages write too), which reshards when the
  world size or the pipeline split changes.
"""

from __future__ import annotations

from pathlib import Path
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from llmray.parallel import state


def blocks(model: nn.Module) -> nn.ModuleDict:
    return model.layers


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = blocks(model)
    for name in list(layers.keys()):
        layers[name] = checkpoint_wrapper(layers[name], preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    for block in blocks(model).values():
        block.compile()


def apply_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None, reshard_after_forward: bool,
               mesh=None) -> None:
    """``mesh``: the data-parallel mesh (1-D shard, or 2-D replicate × shard for HSDP); None = world."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype \
        else MixedPrecisionPolicy()
    for block in blocks(model).values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


class TorchEngine:
    """One process or FSDP2: plain ``backward`` / ``optimizer.step`` with DCP checkpoints."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int):
        self.model = model
        self.optimizer = optimizer
        self.world_size = world_size
        self.sharded = world_size > 1

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers the learning-rate schedule drives."""
        return [self.optimizer]

    def last_grad_norm(self) -> float | None:
        return None

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        if self.sharded:  # reduce-scatter gradients once per step, not per micro-batch
            self.model.set_requires_gradient_sync(last_micro_batch)
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global L2 norm of all gradients (before clipping); clips to ``max_norm`` when > 0."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if max_norm > 0:
            clip_grads_with_norm_(self.model.parameters(), max_norm, norm)
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints (DCP): every rank writes its shards; rank 0 writes .metadata last ----------

    def save(self, directory: Path) -> None:
        state.save([self.model], [self.optimizer], directory)

    def load(self, directory: Path) -> None:
        state.load([self.model], [self.optimizer], directory)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded model weights on CPU (collective under FSDP2; complete on every rank)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

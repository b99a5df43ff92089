"""Weight initialization as a function of (seed, parameter name, position): the same weights on every layout.

Why: a model initialized by one generator in one process gets values that depend on the order
its parameters are visited and on holding them whole. A sharded run (FSDP2 rows, tensor-parallel
rows or columns, pipeline stages) must instead initialize only what each rank holds, right after
sharding a model built on ``meta``, and still start from the weights the single process would
have (the equivalence tests compare against it, and a run must not depend on its layout).

So each parameter's values are drawn in blocks of :data:`ROWS_PER_BLOCK` rows, block ``j`` from
its own generator seeded by a hash of (seed, parameter name, ``j``). A rank holding a shard
generates only the blocks its rows overlap and keeps its slice, so it never allocates the full
parameter (at most one block of it at a time). Gathered from any layout, the weights equal the
single-process initialization bitwise.

:func:`materialize` is the step between sharding and training: allocate the local shards of a
``meta`` model (``to_empty`` with tensor swapping, so tied weights stay one parameter and the
sharding wrappers keep their references) and fill them from a :data:`Source`, which gives any
slice of any parameter: :func:`seeded` draws it by each parameter's :class:`Rule`, and a weights
file (:class:`llmray.model.hf.WeightSlices`) reads just that slice, so a sharded run starting
from pretrained weights never holds them whole either. With ``each``, it goes one module at a
time and hands each module to ``each`` as soon as its own parameters are filled: DeepSpeed ZeRO-3
partitions them there, so a rank never holds more than one module's parameters whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

ROWS_PER_BLOCK = 64
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class Rule:
    """How one parameter starts: ``normal`` (mean 0, ``std``), ``ones`` or ``zeros``."""

    kind: str
    std: float = 0.0


# Initial values of a slice of one parameter: (plain name, full shape, offset of the slice, slice
# shape) -> the slice as a tensor (any float dtype; it is copied into the parameter).
Source = Callable[[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], torch.Tensor]


def seeded(seed: int, rule_for: Callable[[str], Rule]) -> Source:
    """The :data:`Source` of a fresh model: each parameter by its rule, random values from ``seed``."""
    def values(name: str, shape: tuple[int, ...], offset: tuple[int, ...],
               local_shape: tuple[int, ...]) -> torch.Tensor:
        rule = rule_for(name)
        if rule.kind == "ones":
            return torch.ones(local_shape)
        if rule.kind == "zeros":
            return torch.zeros(local_shape)
        if rule.kind == "normal":
            return normal_shard(seed, name, rule.std, shape, offset, local_shape)
        raise ValueError(f"{name}: unknown init rule {rule.kind!r}")
    return values


def canonical_name(name: str) -> str:
    """The parameter's name in the plain model (without activation-checkpoint / compile wrappers)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def materialize(module: nn.Module, device: torch.device, source: Source,
                each: Callable[[nn.Module], None] | None = None) -> None:
    """Allocate ``module``'s (local shards of) parameters on ``device`` and fill them from
    ``source``; with ``each``, module by module, children before parents, calling
    ``each(submodule)`` after each one whose own parameters were filled."""
    if each is None:
        with _swapping_parameters():
            module.to_empty(device=device)
        initialize(module, source)
        return
    names = {id(param): name for name, param in module.named_parameters()}  # a tied one: its first name
    for submodule in reversed(list(module.modules())):  # pre-order reversed: children come first
        own = [param for param in submodule.parameters(recurse=False) if param.device.type == "meta"]
        if not own and all(buffer.device.type != "meta" for buffer in submodule.buffers(recurse=False)):
            continue
        with _swapping_parameters():
            submodule.to_empty(device=device, recurse=False)
        for param in own:
            _fill(param, canonical_name(names[id(param)]), source)
        if own:
            each(submodule)


@torch.no_grad()
def initialize(module: nn.Module, source: Source) -> None:
    """Fill every parameter of ``module`` (plain tensors or DTensor shards) from ``source``."""
    for name, param in module.named_parameters():  # a tied parameter is visited once, by its first name
        _fill(param, canonical_name(name), source)


@torch.no_grad()
def _fill(param: torch.Tensor, name: str, source: Source) -> None:
    local = param.to_local() if is_dtensor(param) else param
    local.copy_(source(name, tuple(param.shape), _global_offset(param), tuple(local.shape)))


def normal_shard(seed: int, name: str, std: float, shape: tuple[int, ...], offset: tuple[int, ...],
                 local_shape: tuple[int, ...]) -> torch.Tensor:
    """The ``local_shape`` slice at ``offset`` of parameter ``name`` (full ``shape``), N(0, std) in fp32."""
    requested = local_shape
    if len(shape) == 1:
        shape, offset, local_shape = (shape[0], 1), (offset[0], 0), (local_shape[0], 1)
    if len(shape) != 2:
        raise ValueError(f"{name}: block initialization handles 1-D and 2-D parameters, got shape {shape}")
    (row0, col0), (rows, cols) = offset, local_shape
    out = torch.empty(rows, cols)
    first, last = row0 // ROWS_PER_BLOCK, (row0 + rows - 1) // ROWS_PER_BLOCK
    for block in range(first, last + 1) if rows else ():
        start = block * ROWS_PER_BLOCK
        height = min(ROWS_PER_BLOCK, shape[0] - start)
        generator = torch.Generator().manual_seed(_block_seed(seed, name, block))
        values = torch.randn(height, shape[1], generator=generator).mul_(std)
        lo, hi = max(start, row0), min(start + height, row0 + rows)
        out[lo - row0:hi - row0] = values[lo - start:hi - start, col0:col0 + cols]
    return out.view(requested)


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def is_dtensor(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DTensor shard, without importing ``torch.distributed.tensor`` (0.6 s, paid
    by every process that loads a model: rollout and eval actors, servers) where nothing else did:
    a process that never imported it holds no DTensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(param, dtensor.DTensor)


def _global_offset(param: torch.Tensor) -> tuple[int, ...]:
    if not is_dtensor(param):
        return (0,) * param.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offset)


@contextlib.contextmanager
def _swapping_parameters() -> Iterator[None]:
    """``Module._apply`` swaps tensor contents instead of assigning new parameters while inside."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)

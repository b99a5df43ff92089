"""Broadcasting the learner's weights to the rollout actors through a process group of their own.

Why: through the object store, each policy version is serialized once by the learner's rank 0,
then copied into every actor (and, for GPU actors, onto its GPU). On a GPU cluster the learner
and the actors can instead join one collective group and broadcast each tensor GPU to GPU
(NCCL), as verl and OpenRLHF do; on CPU the same group runs over gloo, which is how it is tested.

* The group is independent of the learner's own (Ray Train's) process group: a ``TCPStore``
  hosted by rank 0 (port chosen by the OS, on the node's address, open only while the pool
  lives, like Ray Train's own rendezvous), rank 0 as root, the actors as ranks 1..n.
* Every broadcast starts with a fingerprint of the tensors' names, shapes and dtypes, checked by
  every receiver and agreed on by all (an all-reduce), so a model that differs from the
  learner's fails on every member with a clear error, before any weight is written and without
  leaving rank 0 waiting for a receiver that gave up.
* Tensors go in sorted name order, each into the receiver's own parameter storage (no copy of
  the model is built), tied weights twice into the same storage.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class GroupAddress:
    """Where the actors join the group: rank 0's store, the group size, the backend, and a generation
    (a new group after an actor was replaced does not read the previous group's keys)."""

    host: str
    port: int
    world: int
    backend: str  # "nccl" (GPUs) or "gloo"
    generation: int


def host_store(world: int) -> dist.TCPStore:
    """Rank 0's store for a group of ``world`` members, on a free port of this node's address."""
    import ray

    return dist.TCPStore(ray.util.get_node_ip_address(), 0, world, is_master=True, timeout=TIMEOUT,
                         wait_for_workers=False)


def join(address: GroupAddress, rank: int, store: dist.TCPStore | None = None) -> dist.ProcessGroup:
    """This process's member of the group at ``address`` (blocks until all ``world`` members joined)."""
    if store is None:
        store = dist.TCPStore(address.host, address.port, address.world, is_master=False, timeout=TIMEOUT)
    prefixed = dist.PrefixStore(f"llmray-weights/{address.generation}", store)
    if address.backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, address.world)
    return dist.ProcessGroupGloo(prefixed, rank, address.world, TIMEOUT)


def fingerprint(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(4,) int64 hash of the names, shapes and dtypes of ``state``."""
    layout = ";".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in sorted(state.items()))
    digest = hashlib.sha256(layout.encode()).digest()
    return torch.tensor([int.from_bytes(digest[i:i + 8], "little", signed=True) for i in range(0, 32, 8)])


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


MISMATCH = ("the learner's weights differ in names, shapes or dtypes from a rollout actor's model (both must be "
            "loaded from the same model directory, in the same dtype)")


def _all_match(group: dist.ProcessGroup, matches: bool, device: torch.device) -> bool:
    """Whether every member's fingerprint matched (an all-reduce of the members' verdicts)."""
    mismatches = torch.tensor([0 if matches else 1], device=device)
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.MAX
    group.allreduce([mismatches], options).wait()
    return int(mismatches.item()) == 0


def send(group: dist.ProcessGroup, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Rank 0: broadcast ``state`` (the learner's full weights) to every other member."""
    _broadcast(group, fingerprint(state).to(device))
    if not _all_match(group, True, device):
        raise ValueError(MISMATCH)
    for name in sorted(state):
        _broadcast(group, state[name].to(device).contiguous())


def receive(group: dist.ProcessGroup, model: torch.nn.Module) -> None:
    """An actor: receive rank 0's weights into ``model``'s own parameters and buffers."""
    state = model.state_dict()
    device = next(model.parameters()).device
    expected = fingerprint(state).to(device)
    sent = torch.empty_like(expected)
    _broadcast(group, sent)
    if not _all_match(group, torch.equal(sent, expected), device):
        raise ValueError(MISMATCH)
    with torch.no_grad():
        for name in sorted(state):
            _broadcast(group, state[name])

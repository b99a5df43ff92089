"""The device mesh: how many ways the model is pipelined, replicated, sharded and tensor-split.

One object, :class:`ParallelDims`, owns the degrees ``pp × dp_replicate × dp_shard × tp`` and
all arithmetic on them (torchtitan's ``parallel_dims.py`` is the model): the product must equal
the world size (``dp_shard=-1`` takes whatever is left), tensor parallelism must divide the
query and key/value heads (each rank owns whole heads, GQA groups included), the pipeline may
not have more stages than layers, and DeepSpeed is data-parallel only. Validation is pure
arithmetic, so :mod:`tests.unit.test_mesh` checks it without starting a process.

The mesh is laid out outermost to innermost as ``pp, dp_replicate, dp_shard, tp``: tensor
parallelism, which communicates on every layer, gets adjacent ranks (the same host / NVLink
domain); the pipeline, which sends one activation per micro-batch, spans the farthest ranks.
Every dimension is present in the mesh even at degree 1, so callers index ``mesh["tp"]`` without
asking whether it is enabled; ``"dp"`` is the flattened ``dp_replicate × dp_shard`` (batch
sharding, loss reduction).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Resolved parallel degrees; their product is the world size."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @classmethod
    def resolve(cls, world_size: int, *, pp: int = 1, dp_replicate: int = 1, dp_shard: int = -1,
                tp: int = 1) -> "ParallelDims":
        """Degrees for ``world_size`` ranks; ``dp_shard=-1`` is the world size over the others."""
        for name, value in (("pp", pp), ("dp_replicate", dp_replicate), ("tp", tp)):
            if value < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {value}")
        if dp_shard == -1:
            others = pp * dp_replicate * tp
            if world_size % others:
                raise ValueError(f"world size {world_size} is not divisible by pp × dp_replicate × tp = "
                                 f"{pp} × {dp_replicate} × {tp} = {others}, so dp_shard cannot be inferred")
            dp_shard = world_size // others
        elif dp_shard < 1:
            raise ValueError(f"parallel.dp_shard must be >= 1 or -1 (infer), got {dp_shard}")
        dims = cls(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp)
        if dims.world_size != world_size:
            raise ValueError(f"pp × dp_replicate × dp_shard × tp = {pp} × {dp_replicate} × {dp_shard} × {tp} "
                             f"= {dims.world_size}, but the world size is {world_size}")
        return dims

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel replicas of the batch: each sees a different slice of every step."""
        return self.dp_replicate * self.dp_shard

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def validate_model(self, n_layers: int, n_heads: int, n_kv_heads: int, *, virtual_stages: int = 1) -> None:
        """Raise ValueError when the model cannot be split this way."""
        if n_heads % self.tp or n_kv_heads % self.tp:
            raise ValueError(f"parallel.tp={self.tp} must divide the query heads ({n_heads}) and the key/value "
                             f"heads ({n_kv_heads}): every tensor-parallel rank owns whole heads")
        stages = self.pp * virtual_stages
        if self.pp_enabled and stages > n_layers:
            raise ValueError(f"parallel.pp={self.pp} × {virtual_stages} virtual stages = {stages} pipeline stages, "
                             f"more than the model's {n_layers} layers")

    def validate_strategy(self, strategy: str) -> None:
        """DeepSpeed ZeRO is data-parallel only; ``none`` is one process."""
        if strategy == "deepspeed" and (self.tp_enabled or self.pp_enabled):
            raise ValueError(f"parallel.strategy=deepspeed is data-parallel only (ZeRO 1/2/3), but tp={self.tp}, "
                             f"pp={self.pp}; use strategy=fsdp2 for tensor/pipeline parallelism")
        if strategy == "none" and self.world_size > 1:
            raise ValueError(f"parallel.strategy=none runs one process, but the world size is {self.world_size}")
        if strategy == "none" and self.dp_replicate > 1:
            raise ValueError("parallel.dp_replicate > 1 needs strategy=fsdp2 (HSDP)")

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The 4-D mesh ``(pp, dp_replicate, dp_shard, tp)`` with ``"dp"`` = flattened data parallel.

        Collective: every rank of the default process group must call it.
        """
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=MESH_DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh

    def coordinates(self, rank: int) -> dict[str, int]:
        """Position of global ``rank`` on each mesh dimension (row-major, ``tp`` fastest)."""
        coords = {}
        for name, size in zip(reversed(MESH_DIMS), (self.tp, self.dp_shard, self.dp_replicate, self.pp)):
            coords[name] = rank % size
            rank //= size
        coords["dp"] = coords["dp_replicate"] * self.dp_shard + coords["dp_shard"]
        return {name: coords[name] for name in (*MESH_DIMS, "dp")}

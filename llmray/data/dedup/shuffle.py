"""Hash-partitioned shuffles of Arrow tables: the one distributed primitive dedup is built on.

A shuffle takes a list of tables ("parts"), optionally rewrites each part (``map_fn``), splits
every part by ``partition_of(table[key])`` into ``num_partitions`` pieces, and hands each
reducer all pieces of one partition, concatenated (``reduce_fn``), plus that partition's
``side_inputs`` (e.g. a broadcast array, or the same partition of an earlier shuffle: a join). Rows with equal keys always
meet in the same reducer, which is all that grouping (exact-duplicate groups, LSH buckets,
connected-component stars, keep-one-per-cluster) needs; inside a reducer the grouping is a numpy
sort, not a Python loop over groups.

Why plain Ray tasks and not ``Dataset.groupby().map_groups()``: the reducers here are
vectorised over whole partitions (one call per partition, not per group), the connected-
components loop shuffles its edge list a dozen times per run and needs small per-reducer
digests back on the driver, and a task shuffle is a few objects per partition with no actor
start-up. Pieces live in the object store, which spills them to disk when it is full, so the data
only has to fit on disk; the driver only ever holds references and digests.

**Split tasks take runs of parts.** A shuffle runs at most ``max(CPUs, num_partitions)`` split
tasks, each splitting a run of consecutive parts, so it makes that many pieces per partition
however many parts come in. Ray keeps a task result under 100 KiB in the memory of its owner,
the driver, and copies it into the spec of the task that reads it: one split task per part made
``parts x partitions`` pieces, which grows with the square of the input, and at 800 MB of text
those tiny pieces were the largest thing in the driver. Rows reach each reducer in the same
order either way, so results do not depend on the grouping. A split task reads 1/max(CPUs,
partitions) of the shuffled rows, no more than a reducer does (dedup sizes its partitions so
that a reducer gets at most ``PARTITION_BYTES``).

:class:`LocalShuffler` runs the same map/split/reduce functions in-process: unit tests use it
to check the algorithms (against a single-process reference) without a cluster, and dedup's
local plan runs every step after the key pass with it in one task (no shuffle start-up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from llmray.data.dedup.minhash import mix64

log = logging.getLogger("llmray.dedup")
MapFn = Callable[[pa.Table], pa.Table]
ReduceFn = Callable[[pa.Table], Any]
PartitionFn = Callable[[np.ndarray, int], np.ndarray]


def partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition index of each uint64 key (mixed first, so structured keys spread evenly)."""
    return (mix64(keys) % np.uint64(num_partitions)).astype(np.int64)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as a numpy array (zero-copy when the column has one chunk)."""
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False)


def split_table(table: pa.Table, key: str, num_partitions: int, map_fn: MapFn | None = None,
                partition_fn: PartitionFn = partition_of) -> list[pa.Table]:
    """Rewrite ``table`` with ``map_fn`` and split it into ``num_partitions`` tables by
    ``partition_fn(table[key])`` (a hash of the key unless told otherwise)."""
    if map_fn is not None:
        table = map_fn(table)
    if num_partitions == 1:
        return [table]
    parts = partition_fn(column(table, key), num_partitions)
    order = np.argsort(parts, kind="stable")
    bounds = np.searchsorted(parts[order], np.arange(num_partitions + 1))
    return [table.take(order[bounds[p]:bounds[p + 1]]) for p in range(num_partitions)]


def concat(pieces: Sequence[pa.Table]) -> pa.Table:
    non_empty = [p for p in pieces if p.num_rows] or list(pieces[:1])
    return pa.concat_tables(non_empty, promote_options="default").combine_chunks()


def _split_task(key: str, num_partitions: int, map_fn: MapFn | None, partition_fn: PartitionFn,
                *tables: pa.Table):
    """Split a run of consecutive parts: one piece per partition for all of them, in part order."""
    split = [split_table(table, key, num_partitions, map_fn, partition_fn) for table in tables]
    pieces = [concat([pieces[i] for pieces in split]) for i in range(num_partitions)]
    return pieces[0] if num_partitions == 1 else tuple(pieces)


def runs_of(items: Sequence[Any], count: int) -> list[Sequence[Any]]:
    """``items`` cut into at most ``count`` runs of consecutive items, of near-equal length."""
    if not items:
        return []
    per = -(-len(items) // max(1, count))
    return [items[i:i + per] for i in range(0, len(items), per)]


def _reduce_task(reduce_fn: ReduceFn, num_side_inputs: int, *args: Any):
    side, pieces = args[:num_side_inputs], args[num_side_inputs:]
    return reduce_fn(concat(pieces), *side)


_BROADCASTS_KEPT = 4
_broadcasts: dict[str, Any] = {}


def fetch_broadcast(ref: Any) -> Any:
    """A value broadcast by ref (a sorted id array, an index), fetched once per worker process
    and kept for the next batches (numpy arrays come zero-copy from the object store); plain
    values pass through. Holds the last few, since one batch may read several."""
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _broadcasts:
        if len(_broadcasts) >= _BROADCASTS_KEPT:
            del _broadcasts[next(iter(_broadcasts))]
        _broadcasts[key] = ray.get(ref)
    return _broadcasts[key]


class LocalShuffler:
    """In-process shuffles; parts and results are plain values."""

    def put(self, value: Any) -> Any:
        return value

    def get(self, value: Any, what: str | None = None) -> Any:
        return value

    def shuffle(self, parts: Sequence[pa.Table], key: str, num_partitions: int, reduce_fn: ReduceFn,
                map_fn: MapFn | None = None, num_returns: int = 1,
                side_inputs: Sequence[tuple] | None = None, partition_fn: PartitionFn = partition_of) -> list:
        pieces = [split_table(part, key, num_partitions, map_fn, partition_fn) for part in parts]
        side_inputs = side_inputs or [()] * num_partitions
        return [reduce_fn(concat([p[i] for p in pieces]), *side_inputs[i]) for i in range(num_partitions)]

    def run(self, fn: Callable, *args: Any, num_returns: int = 1) -> Any:
        return fn(*args)


class RayShuffler:
    """Shuffles with Ray tasks; parts and results are ``ObjectRef``s (results of reducers with
    ``num_returns > 1`` are tuples of refs, so small parts such as digests can be fetched alone).
    ``cpus``: the cluster's CPUs, the fewest split tasks a shuffle of many parts runs."""

    def __init__(self, cpus: int) -> None:
        import ray

        self._ray, self._cpus = ray, cpus
        self._split = ray.remote(_split_task)
        self._reduce = ray.remote(_reduce_task)
        self._call = ray.remote(lambda fn, *args: fn(*args))

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def get(self, value: Any, what: str | None = None) -> Any:
        """The values of refs; ``what`` names the phase in a progress line when waiting on a list of
        refs takes long (:mod:`llmray.progress`)."""
        if what is not None and isinstance(value, list):
            from llmray import progress

            progress.wait(value, what, logger=log)
        return self._ray.get(value)

    def shuffle(self, parts: Sequence[Any], key: str, num_partitions: int, reduce_fn: ReduceFn,
                map_fn: MapFn | None = None, num_returns: int = 1,
                side_inputs: Sequence[tuple] | None = None, partition_fn: PartitionFn = partition_of) -> list:
        split = self._split.options(num_returns=num_partitions, name=f"split by {key}")
        pieces = [split.remote(key, num_partitions, map_fn, partition_fn, *run)
                  for run in runs_of(parts, max(self._cpus, num_partitions))]
        if num_partitions == 1:
            pieces = [[p] for p in pieces]
        side_inputs = side_inputs or [()] * num_partitions
        reduce = self._reduce.options(num_returns=num_returns, name=task_name(reduce_fn))
        return [reduce.remote(reduce_fn, len(side_inputs[i]), *side_inputs[i], *[p[i] for p in pieces])
                for i in range(num_partitions)]

    def run(self, fn: Callable, *args: Any, num_returns: int = 1) -> Any:
        """Run ``fn(*args)`` as a task (refs among ``args`` are resolved on the worker)."""
        return self._call.options(num_returns=num_returns, name=task_name(fn)).remote(fn, *args)


@dataclass(frozen=True)
class SliceGroups:
    """Range partitioning of row positions: slice ``s`` holds rows ``starts[s]`` up to the next
    slice's start and belongs to group ``s // per_group``, so each group is a run of whole slices."""

    starts: np.ndarray  # int64, ascending: the first position of each slice
    per_group: int

    def __call__(self, positions: np.ndarray, num_groups: int) -> np.ndarray:
        return self.slice_of(positions) // self.per_group

    def slice_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, positions, side="right") - 1


@dataclass(frozen=True)
class _split_slices:
    """Reducer of :func:`route_to_slices`: a group's rows as one table per slice of the group,
    sorted by position (slices past the last one get empty tables)."""

    groups: SliceGroups
    key: str

    def __call__(self, table: pa.Table, group: int) -> tuple[pa.Table, ...] | pa.Table:
        table = table.sort_by(self.key)
        first = group * self.groups.per_group
        bounds = np.searchsorted(self.groups.slice_of(column(table, self.key)),
                                 np.arange(first, first + self.groups.per_group + 1))
        pieces = tuple(table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(self.groups.per_group))
        return pieces if len(pieces) > 1 else pieces[0]


def route_to_slices(shuffler: LocalShuffler | RayShuffler, parts: Sequence[Any], key: str, starts: Sequence[int],
                    num_groups: int) -> list:
    """Rows of ``parts`` routed to the slice their ``key`` (a row position) falls in: one table
    (or ref) per slice, sorted by position. This is the join of per-document decisions with the
    documents, by position: each slice's task then reads only its own rows, where a broadcast
    would send every decision to every task. ``num_groups`` reducers each own a run of slices,
    so the driver holds ``len(parts) x num_groups`` pieces plus one ref per slice."""
    num_slices = len(starts)
    per_group = -(-num_slices // max(1, min(num_groups, num_slices)))
    groups = SliceGroups(np.asarray(starts, dtype=np.int64), per_group)
    count = -(-num_slices // per_group)
    routed = shuffler.shuffle(parts, key, count, _split_slices(groups, key), num_returns=per_group,
                              side_inputs=[(g,) for g in range(count)], partition_fn=groups)
    flat = [piece for group in routed for piece in (group if per_group > 1 else [group])]
    return flat[:num_slices]


def task_name(fn: Callable) -> str:
    """What the dashboard and ``ray timeline`` call a task running ``fn`` (a function, or a
    callable dataclass instance named by its class)."""
    return getattr(fn, "__name__", type(fn).__name__)

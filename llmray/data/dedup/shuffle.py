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
digests back on the driver, and a task shuffle is ``num_parts x num_partitions`` small objects
with no actor start-up. Pieces live in the object store, which spills them to disk when it is
full, so the data only has to fit on disk; the driver only ever holds references and digests.

:class:`LocalShuffler` runs the same map/split/reduce functions in-process: unit tests use it
to check the algorithms (against a single-process reference) without a cluster, and dedup's
local plan runs every step after the key pass with it in one task (no shuffle start-up).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from llmray.data.dedup.minhash import mix64

log = logging.getLogger("llmray.dedup")
MapFn = Callable[[pa.Table], pa.Table]
ReduceFn = Callable[[pa.Table], Any]


def partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition index of each uint64 key (mixed first, so structured keys spread evenly)."""
    return (mix64(keys) % np.uint64(num_partitions)).astype(np.int64)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as a numpy array (zero-copy when the column has one chunk)."""
    return table.column(name).combine_chunks().to_numpy(zero_copy_only=False)


def split_table(table: pa.Table, key: str, num_partitions: int,
                map_fn: MapFn | None = None) -> list[pa.Table]:
    """Rewrite ``table`` with ``map_fn`` and split it into ``num_partitions`` tables by ``key``."""
    if map_fn is not None:
        table = map_fn(table)
    if num_partitions == 1:
        return [table]
    parts = partition_of(column(table, key), num_partitions)
    order = np.argsort(parts, kind="stable")
    bounds = np.searchsorted(parts[order], np.arange(num_partitions + 1))
    return [table.take(order[bounds[p]:bounds[p + 1]]) for p in range(num_partitions)]


def concat(pieces: Sequence[pa.Table]) -> pa.Table:
    non_empty = [p for p in pieces if p.num_rows] or list(pieces[:1])
    return pa.concat_tables(non_empty, promote_options="default").combine_chunks()


def _split_task(table: pa.Table, key: str, num_partitions: int, map_fn: MapFn | None):
    pieces = split_table(table, key, num_partitions, map_fn)
    return pieces[0] if num_partitions == 1 else tuple(pieces)


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
                side_inputs: Sequence[tuple] | None = None) -> list:
        pieces = [split_table(part, key, num_partitions, map_fn) for part in parts]
        side_inputs = side_inputs or [()] * num_partitions
        return [reduce_fn(concat([p[i] for p in pieces]), *side_inputs[i]) for i in range(num_partitions)]

    def run(self, fn: Callable, *args: Any, num_returns: int = 1) -> Any:
        return fn(*args)


class RayShuffler:
    """Shuffles with Ray tasks; parts and results are ``ObjectRef``s (results of reducers with
    ``num_returns > 1`` are tuples of refs, so small parts such as digests can be fetched alone)."""

    def __init__(self) -> None:
        import ray

        self._ray = ray
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
                side_inputs: Sequence[tuple] | None = None) -> list:
        split = self._split.options(num_returns=num_partitions, name=f"split by {key}")
        pieces = [split.remote(part, key, num_partitions, map_fn) for part in parts]
        if num_partitions == 1:
            pieces = [[p] for p in pieces]
        side_inputs = side_inputs or [()] * num_partitions
        reduce = self._reduce.options(num_returns=num_returns, name=task_name(reduce_fn))
        return [reduce.remote(reduce_fn, len(side_inputs[i]), *side_inputs[i], *[p[i] for p in pieces])
                for i in range(num_partitions)]

    def run(self, fn: Callable, *args: Any, num_returns: int = 1) -> Any:
        """Run ``fn(*args)`` as a task (refs among ``args`` are resolved on the worker)."""
        return self._call.options(num_returns=num_returns, name=task_name(fn)).remote(fn, *args)


def task_name(fn: Callable) -> str:
    """What the dashboard and ``ray timeline`` call a task running ``fn`` (a function, or a
    callable dataclass instance named by its class)."""
    return getattr(fn, "__name__", type(fn).__name__)

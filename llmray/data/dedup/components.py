"""Connected components of a graph too large for one machine: alternating large-star/small-star.

The algorithm is Kiveris et al., "Connected Components in MapReduce and Beyond" (SoCC 2014):
each operation groups the edge list by one endpoint (a shuffle) and rewires every group into a
star around the smallest node id it can see:

* large-star(u): m = min(Γ(u) ∪ {u}); for every neighbour v > u emit edge (v, m);
* small-star(u): N = {v ∈ Γ(u): v < u}, m = min(N ∪ {u}); emit (v, m) for every v ∈ N ∪ {u}, v ≠ m.

Alternating the two converges to one star per component whose centre is the component's
smallest node, in O(log² n) rounds; the result maps every other node to that centre. Memory is
bounded by the edge list (each reducer holds one partition of it), never by the documents.

Convergence: each large-star reducer deduplicates the (directed, both-ways) edges it receives
and returns an order-independent digest of them (a wrapped sum of mixed edge hashes); the edge
set of a round equals the previous round's exactly when the digests sum to the same value, and
an unchanged edge set is a fixed point, which the paper shows is the star forest.

Nodes are uint64 ids (dedup uses a 64-bit hash of the document id), so labels do not depend on
block layout or partition count: the output is deterministic.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from llmray.data.dedup.minhash import mix64
from llmray.data.dedup.shuffle import column, log
from llmray.progress import Progress

SRC, DST = "src", "dst"
MAX_ROUNDS = 64


def edge_table(src: np.ndarray, dst: np.ndarray) -> pa.Table:
    return pa.table({SRC: np.asarray(src, dtype=np.uint64), DST: np.asarray(dst, dtype=np.uint64)})


def _edges(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    return column(table, SRC).astype(np.uint64, copy=False), column(table, DST).astype(np.uint64, copy=False)


def unique_edges(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (src, dst) pairs sorted by src then dst."""
    if src.size == 0:
        return src, dst
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    keep = np.ones(src.size, dtype=bool)
    keep[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    return src[keep], dst[keep]


def _group_min(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """For rows sorted by src: min(src, min of dst over the row's src group), per row."""
    starts = np.flatnonzero(np.concatenate([[True], src[1:] != src[:-1]]))
    group_min = np.minimum(np.minimum.reduceat(dst, starts), src[starts])
    return np.repeat(group_min, np.diff(np.append(starts, src.size)))


def edge_digest(src: np.ndarray, dst: np.ndarray) -> int:
    """Order-independent digest of a set of directed edges."""
    with np.errstate(over="ignore"):
        return int(mix64(src ^ mix64(dst)).sum(dtype=np.uint64))


# -- the two operations: map (direct edges, partition key = src) and reduce (one partition) -----

def both_directions(table: pa.Table) -> pa.Table:
    src, dst = _edges(table)
    loop = src == dst
    return edge_table(np.concatenate([src[~loop], dst[~loop]]), np.concatenate([dst[~loop], src[~loop]]))


def large_star(table: pa.Table) -> tuple[pa.Table, int]:
    src, dst = unique_edges(*_edges(table))
    digest = edge_digest(src, dst)
    if src.size == 0:
        return edge_table(src, dst), digest
    m = _group_min(src, dst)
    keep = dst > src
    return edge_table(dst[keep], m[keep]), digest


def larger_first(table: pa.Table) -> pa.Table:
    src, dst = _edges(table)
    loop = src == dst
    return edge_table(np.maximum(src, dst)[~loop], np.minimum(src, dst)[~loop])


def small_star(table: pa.Table) -> pa.Table:
    src, dst = unique_edges(*_edges(table))  # every row has dst < src
    if src.size == 0:
        return edge_table(src, dst)
    m = _group_min(src, dst)
    first = np.concatenate([[True], src[1:] != src[:-1]])
    keep = dst != m
    return edge_table(np.concatenate([dst[keep], src[first]]), np.concatenate([m[keep], m[first]]))


def star_roots(table: pa.Table) -> pa.Table:
    """Final (node, root) pairs from a converged star forest (every edge joins a leaf to its root)."""
    src, dst = unique_edges(*_edges(larger_first(table)))
    return pa.table({"node": src, "root": dst})


def connected_components(edge_parts: list, shuffler, num_partitions: int,
                         max_rounds: int = MAX_ROUNDS) -> tuple[list, int]:
    """Label every node that has an edge with the smallest node of its component.

    ``edge_parts`` are tables (or refs to tables, for a Ray shuffler) with uint64 columns
    ``src`` and ``dst``. Returns ``(parts, rounds)``: tables (refs) of ``node, root`` pairs, one
    per partition, covering every node except the roots themselves.
    """
    parts = list(edge_parts)
    previous = None
    progress = Progress("dedup: connected components", unit="rounds", logger=log)  # no ETA: rounds are unknown
    for rounds in range(1, max_rounds + 1):
        results = shuffler.shuffle(parts, SRC, num_partitions, large_star, map_fn=both_directions,
                                   num_returns=2)
        digest = sum(shuffler.get([d for _, d in results], f"dedup: connected components, round {rounds}")) % 2**64
        progress.advance()
        parts = [edges for edges, _ in results]
        if digest == previous:
            progress.finish(f"converged after {rounds} rounds")
            return shuffler.shuffle(parts, SRC, num_partitions, star_roots), rounds
        previous = digest
        parts = shuffler.shuffle(parts, SRC, num_partitions, small_star, map_fn=larger_first)
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")

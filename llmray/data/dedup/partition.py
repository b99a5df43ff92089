"""The per-partition steps of deduplication, on Arrow tables: pure functions, no Ray.

:mod:`llmray.data.dedup` wires them into shuffles (``shuffle.py``); each one sees one hash
partition, so everything it groups by is complete inside the table it gets. Kept apart from the
wiring so they read (and test) as plain table transformations.

The keep rule is one sort: rows are ordered by group, then by the rule's preference, then by
document id, and the first row of each group is kept. Ties always end at the smallest id, so
the result never depends on input order, block layout or partition count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmray.data.dedup.components import DST, SRC, edge_table, unique_edges
from llmray.data.dedup.minhash import row_jaccard
from llmray.data.dedup.shuffle import column

KeepRule = Literal["first_id", "longest", "quality"]
# ``position``: the document's row number in dedup's input, which routes a decision back to the
# slice of rows it came from (see ``shuffle.route_to_slices``).
REMOVED_SCHEMA = pa.schema([("node", pa.uint64()), ("id", pa.string()), ("source", pa.string()),
                            ("bytes", pa.int64()), ("kept_id", pa.string()), ("position", pa.int64())])
INFO_COLUMNS = ["node", "id", "source", "chars", "bytes", "quality", "position"]

_PREFERENCE: dict[str, list[tuple[str, str]]] = {
    "first_id": [],
    "longest": [("chars", "descending")],
    "quality": [("quality", "descending"), ("chars", "descending")],
}


def group_starts(*keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal key tuples starts (rows sorted by the keys)."""
    if keys[0].size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.zeros(keys[0].size, dtype=bool)
    change[0] = True
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    return np.flatnonzero(change)


def choose_kept(table: pa.Table, group_keys: list[str], rule: KeepRule) -> tuple[pa.Table, np.ndarray]:
    """Keep one row per group by ``rule``; return the others (``REMOVED_SCHEMA``, ``kept_id`` =
    the id kept in their group) and the sizes of groups with more than one row."""
    quality = pc.fill_null(pc.if_else(pc.is_nan(table["quality"]), -np.inf, table["quality"]), -np.inf)
    table = table.set_column(table.schema.get_field_index("quality"), "quality", quality)
    order = [(k, "ascending") for k in group_keys] + _PREFERENCE[rule] + [("id", "ascending")]
    table = table.sort_by(order)
    starts = group_starts(*(column(table, k) for k in group_keys))
    sizes = np.diff(np.append(starts, table.num_rows))
    is_first = np.zeros(table.num_rows, dtype=bool)
    is_first[starts] = True
    kept_ids = pc.take(table["id"], pa.array(np.repeat(starts, sizes)))
    removed = pa.table({"node": table["node"], "id": table["id"], "source": table["source"],
                        "bytes": table["bytes"], "kept_id": kept_ids,
                        "position": table["position"]}).filter(pa.array(~is_first))
    return removed.cast(REMOVED_SCHEMA), sizes[sizes > 1]


@dataclass(frozen=True)
class bucket_edges:
    """Reducer of the band shuffle: candidate edges from LSH buckets (rows ``(band_key, node)``).

    Every document sharing a bucket is joined to the bucket's smallest node (a star per bucket),
    which is all that connected components need when edges are accepted as they are. With
    ``chain`` each member is also joined to the next smaller member, so that when verification
    drops a member's edge to the centre (similar to another member, not to the centre) a second
    path remains. Nodes in the sorted array ``excluded`` (already removed as exact duplicates)
    take no part."""

    chain: bool = False

    def __call__(self, table: pa.Table, excluded: np.ndarray) -> pa.Table:
        keys, nodes = column(table, "band_key"), column(table, "node")
        keep = ~_contains(excluded, nodes)
        keys, nodes = keys[keep], nodes[keep]
        order = np.lexsort((nodes, keys))
        keys, nodes = keys[order], nodes[order]
        distinct = np.ones(keys.size, dtype=bool)
        distinct[1:] = (keys[1:] != keys[:-1]) | (nodes[1:] != nodes[:-1])
        keys, nodes = keys[distinct], nodes[distinct]
        starts = group_starts(keys)
        sizes = np.diff(np.append(starts, keys.size))
        smallest = np.repeat(nodes[starts], sizes)
        member = smallest != nodes
        src, dst = nodes[member], smallest[member]
        if self.chain and keys.size > 1:
            follows = np.zeros(keys.size, dtype=bool)
            follows[1:] = (keys[1:] == keys[:-1]) & (nodes[:-1] != smallest[1:])
            src = np.concatenate([src, nodes[follows]])
            dst = np.concatenate([dst, nodes[np.flatnonzero(follows) - 1]])
        return edge_table(src, dst)


def sorted_by_node(table: pa.Table) -> pa.Table:
    return table.sort_by("node")


def ragged(lists: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list column, whatever its slicing or chunking."""
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, pc.list_flatten(lists).to_numpy(zero_copy_only=False)


def _shingles_of(shingles: pa.Table, nodes: np.ndarray) -> pa.Array:
    """The ``shingles`` lists of ``nodes`` from a table sorted by node (every node is present:
    only documents with shingles get band keys, so only they have edges)."""
    position = np.searchsorted(column(shingles, "node"), nodes)
    return shingles.column("shingles").combine_chunks().take(pa.array(position, pa.int64()))


def attach_source_shingles(edges: pa.Table, shingles: pa.Table) -> pa.Table:
    """Distinct edges of one ``src`` partition with the source document's shingles attached."""
    src, dst = unique_edges(column(edges, SRC), column(edges, DST))
    return edge_table(src, dst).append_column("src_shingles", _shingles_of(shingles, src))


@dataclass(frozen=True)
class similar_edges:
    """Reducer on a ``dst`` partition: the edges whose documents' exact shingle Jaccard is at
    least ``threshold``."""

    threshold: float

    def __call__(self, edges: pa.Table, shingles: pa.Table) -> pa.Table:
        src, dst = column(edges, SRC), column(edges, DST)
        if src.size == 0:
            return edge_table(src, dst)
        similarity = row_jaccard(ragged(edges.column("src_shingles").combine_chunks()),
                                 ragged(_shingles_of(shingles, dst)))
        keep = similarity >= self.threshold
        return edge_table(src[keep], dst[keep])


def with_roots_as_members(table: pa.Table) -> pa.Table:
    """``(node, root)`` pairs plus ``(root, root)`` so every cluster member has a row."""
    nodes, roots = column(table, "node"), column(table, "root")
    return pa.table({"node": np.concatenate([nodes, roots]), "root": np.concatenate([roots, roots])})


def distinct_members(table: pa.Table) -> pa.Table:
    nodes, roots = column(table, "node"), column(table, "root")
    unique, first = np.unique(nodes, return_index=True)
    return pa.table({"node": unique, "root": roots[first]})


def attach_roots(info: pa.Table, members: pa.Table) -> pa.Table:
    """Inner join of document info rows with the ``(node, root)`` rows of the same partition."""
    member_nodes = column(members, "node")  # sorted by distinct_members
    nodes = column(info, "node")
    found = _contains(member_nodes, nodes)
    info = info.filter(pa.array(found))
    roots = column(members, "root")[np.searchsorted(member_nodes, nodes[found])]
    return info.append_column("root", pa.array(roots, type=pa.uint64()))


def _contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    if sorted_values.size == 0:
        return np.zeros(values.size, dtype=bool)
    position = np.minimum(np.searchsorted(sorted_values, values), sorted_values.size - 1)
    return sorted_values[position] == values


def contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Membership of ``values`` in a sorted uint64 array (vectorised ``in``)."""
    return _contains(sorted_values, values)

"""Connected components (large-star/small-star over hash partitions) against a Python union-find."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from llmray.data.dedup.components import connected_components, edge_table
from llmray.data.dedup.shuffle import LocalShuffler, split_table


def union_find_roots(edges: list[tuple[int, int]]) -> dict[int, int]:
    """Reference: node -> smallest node of its component, for every non-root node with an edge."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = {x: find(x) for x in list(parent)}
    return {x: r for x, r in roots.items() if x != r}


def run_components(edges: list[tuple[int, int]], num_parts: int, num_partitions: int) -> dict[int, int]:
    src = np.array([a for a, _ in edges], dtype=np.uint64)
    dst = np.array([b for _, b in edges], dtype=np.uint64)
    table = edge_table(src, dst)
    parts = [table.slice(i * len(edges) // num_parts, len(edges) // num_parts + 1) for i in range(num_parts)]
    out, _ = connected_components(parts, LocalShuffler(), num_partitions)
    result = pa.concat_tables(out)
    nodes, roots = result.column("node").to_pylist(), result.column("root").to_pylist()
    assert len(nodes) == len(set(nodes)), "a node was given two roots"
    return dict(zip(nodes, roots))


def test_transitive_chain_is_one_component():
    # A~B, B~C, A!~C: one cluster rooted at the smallest node.
    assert run_components([(30, 20), (20, 10)], num_parts=1, num_partitions=2) == {30: 10, 20: 10}


def test_long_path_and_separate_components():
    path = [(i, i + 1) for i in range(100, 160)]
    other = [(5, 7), (7, 9), (1000, 2000)]
    expected = union_find_roots(path + other)
    assert run_components(path + other, num_parts=3, num_partitions=4) == expected
    assert expected[159] == 100 and expected[9] == 5 and expected[2000] == 1000


def test_self_loops_and_repeated_edges():
    edges = [(4, 4), (4, 2), (2, 4), (4, 2), (8, 8)]
    assert run_components(edges, num_parts=2, num_partitions=3) == {4: 2}


def test_large_uint64_ids():
    big = 2**64 - 1
    edges = [(big, big - 5), (big - 5, 2**63)]
    assert run_components(edges, 1, 2) == {big: 2**63, big - 5: 2**63}


@settings(max_examples=60, deadline=None)
@given(edges=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=80),
       num_parts=st.integers(1, 4), num_partitions=st.integers(1, 5))
def test_matches_union_find(edges, num_parts, num_partitions):
    assert run_components(edges, num_parts, num_partitions) == union_find_roots(edges)


def test_split_table_keeps_every_row_once():
    table = edge_table(np.arange(1000, dtype=np.uint64), np.zeros(1000, dtype=np.uint64))
    pieces = split_table(table, "src", 7)
    got = sorted(v for p in pieces for v in p.column("src").to_pylist())
    assert got == list(range(1000))

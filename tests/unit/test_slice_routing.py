"""Routing per-document decisions back to the slices of rows they concern (dedup's join by row
position), without Ray: every row reaches exactly its slice, sorted, whatever the grouping."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from llmray.data.dedup.shuffle import LocalShuffler, _split_task, partition_of, route_to_slices, runs_of, split_table


def _parts(positions: np.ndarray, pieces: int, rng: np.random.Generator) -> list[pa.Table]:
    shuffled = rng.permutation(positions)
    return [pa.table({"position": chunk, "value": [f"row {p}" for p in chunk]})
            for chunk in np.array_split(shuffled, pieces)]


@pytest.mark.parametrize("num_groups", [1, 2, 3, 7, 50])
def test_each_slice_gets_exactly_its_rows_in_position_order(num_groups):
    rng = np.random.default_rng(num_groups)
    starts = [0, 10, 10, 25, 40, 41, 90]  # slice 1 is empty; the last slice runs to the end
    positions = rng.choice(120, size=60, replace=False).astype(np.int64)
    routed = route_to_slices(LocalShuffler(), _parts(positions, 5, rng), "position", starts, num_groups)
    assert len(routed) == len(starts)
    bounds = starts[1:] + [np.iinfo(np.int64).max]
    for start, stop, table in zip(starts, bounds, routed):
        expected = np.sort(positions[(positions >= start) & (positions < stop)])
        assert table.column("position").to_pylist() == expected.tolist()
        assert table.column("value").to_pylist() == [f"row {p}" for p in expected]


def test_no_rows_gives_empty_tables_with_the_schema():
    empty = pa.table({"position": pa.array([], pa.int64()), "value": pa.array([], pa.string())})
    routed = route_to_slices(LocalShuffler(), [empty, empty], "position", [0, 5, 9], 2)
    assert [t.num_rows for t in routed] == [0, 0, 0]
    assert all(t.schema == empty.schema for t in routed)


@pytest.mark.parametrize("count", [1, 2, 10, 91, 500])
def test_split_tasks_take_runs_of_consecutive_parts_and_give_each_partition_its_rows_in_part_order(count):
    """A shuffle's split tasks take runs of parts (so the pieces do not multiply with the parts):
    the runs must cover every part once, in order, and splitting a run must give each partition
    exactly what splitting its parts one by one and concatenating would."""
    parts = list(range(91))
    runs = runs_of(parts, count)
    assert len(runs) <= count and [p for run in runs for p in run] == parts
    rng = np.random.default_rng(count)
    tables = _parts(np.arange(300, dtype=np.int64), 7, rng)
    for run in runs_of(tables, count):
        together = _split_task("position", 4, None, partition_of, *run)
        one_by_one = [split_table(t, "position", 4) for t in run]
        assert [t.to_pydict() for t in together] == \
            [pa.concat_tables([pieces[i] for pieces in one_by_one]).to_pydict() for i in range(4)]

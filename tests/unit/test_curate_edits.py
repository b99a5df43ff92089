"""Dedup's edits of kept rows inside curate, without Ray: boilerplate lines leave the text, flagged
documents get ``meta.contamination``, rows already dropped are untouched, and the funnel shows the
counts on the stage's row (and only then grows a "changed" column)."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pyarrow as pa

from llmray.data import curate, funnel, records
from llmray.data.dedup import REJECTED_SCHEMA, KeptEdits, boilerplate, node_ids

BANNER = "Sign up for our newsletter to get the latest stories every week."
BODY = "The river rose overnight and the town moved its market to the hill."


def _row(doc_id: str, text: str, meta: dict | None = None) -> dict:
    row = records.document_row("web", "site.jsonl", int(doc_id[-1]), text, domain="text", meta=meta)
    row["id"] = doc_id
    return row


def _rows() -> list[dict]:
    rows = [_row("doc-1", f"{BANNER}\n{BODY}"), _row("doc-2", f"{BODY} Again.\n{BANNER}", {"title": "Café"}),
            _row("doc-3", f"{BANNER}\nA duplicate of something kept."), _row("doc-4", f"{BANNER}\nRejected early.")]
    records.reject(rows[3], "c4", "too_few_sentences", 1.0)
    return rows


def _edits(flag_ids: list[str], masks: list[int]) -> KeptEdits:
    lines = np.array([boilerplate.line_hash(boilerplate.line_key(BANNER))], dtype=np.uint64)
    nodes = node_ids(flag_ids)
    order = np.argsort(nodes)
    return KeptEdits(lines, 20, (nodes[order], np.array(masks, np.uint64)[order]), ("arc", "piqa"))


FIRST_POSITION = 40  # the slice's first row is row 40 of curate's rows


def _dropped(ids: list[str], copies: int = 1) -> pa.Table:
    """Dedup's drops of the slice ``_rows() * copies``, each at its row position (doc-N of copy k
    is row 4k + N - 1)."""
    ids = ids * copies
    positions = [FIRST_POSITION + 4 * (k // max(1, len(ids) // copies)) + int(i[-1]) - 1 for k, i in enumerate(ids)]
    return pa.table({"id": ids, "source": ["web"] * len(ids), "stage": ["exact_dedup"] * len(ids),
                     "reason": ["exact_duplicate"] * len(ids), "value": ["doc-1"] * len(ids),
                     "position": positions}, schema=REJECTED_SCHEMA)


def test_kept_rows_lose_boilerplate_lines_and_flagged_ones_name_their_tasks():
    table = records.to_table(_rows())
    rows = curate._mark_dropped(table, FIRST_POSITION, _dropped(["doc-3"]), _edits(["doc-2"], [0b10])).to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert by_id["doc-1"]["text"] == BODY and by_id["doc-2"]["text"] == f"{BODY} Again."
    assert json.loads(by_id["doc-2"]["meta"]) == {"title": "Café", "contamination": ["piqa"]}
    assert "Café" in by_id["doc-2"]["meta"]  # same JSON form as records.document_row (no \\u escapes)
    assert json.loads(by_id["doc-1"]["meta"]) == {}
    signals = json.loads(by_id["doc-2"]["signals"])
    assert signals == {"edit.boilerplate.documents_changed": 1.0, "edit.boilerplate.lines_removed": 1.0,
                       "edit.boilerplate.bytes_removed": float(len(BANNER) + 1),
                       "edit.decontamination.documents_flagged": 1.0}
    # rows dropped by dedup or earlier keep their text (a preview for sample_rejected) and get no edits
    assert (by_id["doc-3"]["stage"], by_id["doc-3"]["detail"]) == ("exact_dedup", "doc-1")
    assert by_id["doc-3"]["text"].startswith(BANNER) and by_id["doc-4"]["text"].startswith(BANNER)
    assert by_id["doc-3"]["signals"] is None and by_id["doc-4"]["signals"] is None


def test_no_drops_and_no_edits_return_the_block_unchanged():
    table = records.to_table(_rows())
    assert curate._mark_dropped(table, FIRST_POSITION, _dropped([]), KeptEdits()) is table


def test_funnel_rows_and_tables_show_edits(tmp_path):
    rows = curate._mark_dropped(records.to_table(_rows()), FIRST_POSITION, _dropped(["doc-3"]), _edits(["doc-2"], [0b11]))
    stages = ["c4", "boilerplate", "exact_dedup", "near_dedup", "decontamination"]
    tally = funnel.FunnelTally(0)
    tally.add(rows)
    summary = tally.summary(stages)
    by_stage = {s["stage"]: s for s in summary["stages"]}
    assert by_stage["boilerplate"]["edits"] == {"documents_changed": 2, "bytes_removed": 2 * (len(BANNER) + 1),
                                                "lines_removed": 2}
    assert by_stage["decontamination"]["edits"] == {"documents_flagged": 1}
    assert by_stage["decontamination"]["docs_in"] == by_stage["decontamination"]["docs_out"] == 2
    assert "edits" not in by_stage["exact_dedup"] and summary["per_source"]["web"][1]["edits"]["lines_removed"] == 2
    assert not any(name.startswith("edit.") for name in summary["signals"])  # counts, not histograms
    table = funnel._stage_table(summary["stages"]).splitlines()
    assert table[0].endswith("| changed |")
    assert table[3].endswith(f"| 2 documents changed, {2 * (len(BANNER) + 1)} bytes removed, 2 lines removed |")
    assert table[6].endswith("| 1 documents flagged |") and table[5].endswith("|  |")


def test_funnel_table_without_edits_keeps_its_columns():
    tally = funnel.FunnelTally(0)
    tally.add(records.to_table(_rows()))
    summary = tally.summary(["c4"])
    table = funnel._stage_table(summary["stages"]).splitlines()
    assert table[0] == "| stage | docs in | docs out | kept % | MB in | MB out | est. tokens out |"
    assert all("edits" not in row for row in summary["stages"])


def test_slice_tallies_merged_in_order_equal_one_tally_of_the_whole_stream():
    """Workers count their slices; the driver's merge must give the funnel of the whole stream,
    including the capped "first values" lists (samples) and the signal samples, in stream order."""
    rows = curate._mark_dropped(records.to_table(_rows() * 3), FIRST_POSITION, _dropped(["doc-3"], copies=3),
                                _edits(["doc-2"], [0b11]))
    whole = funnel.FunnelTally(sample_rejected=2)
    whole.add(rows)
    merged = funnel.FunnelTally(sample_rejected=2)
    dropped = Counter()
    for start in range(0, rows.num_rows, 4):
        part = funnel.FunnelTally(sample_rejected=2)
        part.add(rows.slice(start, 4))
        dropped += merged.merge_json(part.to_json())
    stages = ["c4", "boilerplate", "exact_dedup", "near_dedup", "decontamination"]
    assert merged.summary(stages) == whole.summary(stages)
    assert merged.samples_jsonl() == whole.samples_jsonl() and max(map(len, whole.samples.values())) == 2
    assert dropped == whole.dropped and sum(dropped.values()) > 0


def test_the_signal_sample_is_bounded_spread_over_the_whole_stream_and_independent_of_slicing():
    """The driver merges one slice's signal values after another: its sample must stay within its
    capacity however long the corpus, describe the end of the stream as well as the start, and
    be the same whether the stream arrived whole or in slices of any size."""
    stream = [float(i) for i in range(100_000)]
    whole = funnel.SignalSample(capacity=100)
    whole.extend(stream)
    sliced, start = funnel.SignalSample(capacity=100), 0
    for size in itertools.cycle((1, 7, 333, 4096)):
        if start >= len(stream):
            break
        sliced.extend(stream[start:start + size])
        start += size
    assert sliced.values == whole.values
    assert 50 <= len(whole.values) <= 100
    steps = set(b - a for a, b in zip(whole.values, whole.values[1:]))
    assert steps == {float(whole.stride)} and whole.values[0] == 0.0 and whole.values[-1] >= 0.99 * len(stream)


def test_a_slice_s_sparser_signal_sample_keeps_its_share_of_the_merged_one():
    """A slice that sends every 4th value of 4,000 rows and one that sends all of its 1,000 rows
    stand for 4,000 and 1,000 rows of the stream: the driver's sample keeps them 4 to 1."""
    sparse, dense = funnel.SignalSample(capacity=1000), funnel.SignalSample(capacity=1000)
    sparse.extend([0.0] * 4000)
    dense.extend([1.0] * 1000)
    assert (sparse.stride, len(sparse.values), dense.stride) == (4, 1000, 1)
    merged = funnel.SignalSample(capacity=500)
    for part in (sparse, dense):
        merged.extend(part.values, weight=part.stride)
    zeros, ones = merged.values.count(0.0), merged.values.count(1.0)
    assert (zeros, ones) == (250, 63)  # positions 0, 16, ... of 4,000 and of the next 1,000 (unweighted: 250 / 250)

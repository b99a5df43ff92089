"""Every quarantine row names the 1-based line of its record (JSONL, CSV, text), CSV fields of
any size up to ``max_doc_bytes`` are read, and a document keeps its source record's id."""

from __future__ import annotations

import csv
import io
import json

from llmray.data.readers import sources
from tests.hostile.conftest import jsonl_bytes


def read(source: sources.SourceConfig, **limits) -> list[dict]:
    return [row for unit in sources.plan([source]) for row in
            sources.read_unit(unit, source, sources.ReadLimits(**limits))]


def bad_lines(rows: list[dict]) -> list[tuple[int, str]]:
    return [(r["offset"], r["error"]) for r in rows if r["error"] is not None]


def test_jsonl_quarantine_rows_and_messages_name_the_1_based_line(c4_records, tmp_path):
    good = jsonl_bytes(c4_records[:3]).splitlines(keepends=True)
    path = tmp_path / "web.jsonl"
    path.write_bytes(good[0] + b"\n" + good[1] + b'{"text": "torn\n' + good[2] + b"[1, 2]\n")
    rows = read(sources.SourceConfig(name="web", kind="jsonl", paths=[str(path)]))
    assert bad_lines(rows) == [(4, "JSONDecodeError"), (6, "NotAnObject")]
    assert [r["message"].split(": ")[0] for r in rows if r["error"]] == [f"{path}:4", f"{path}:6"]


def test_csv_quarantine_rows_name_the_line_a_multiline_record_starts_on(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_bytes(b'id,tweet\n1,"first\nspans two lines"\n2,' + b"x" * 300 + b"\n3,third\n")
    rows = read(sources.SourceConfig(name="t", kind="csv", paths=[str(path)], text_field="tweet"),
                max_doc_bytes=200)
    assert bad_lines(rows) == [(4, "DocumentTooLarge")]
    assert rows[1]["message"].startswith(f"{path}:4: ")
    kept = [r for r in rows if r["error"] is None]
    assert [r["text"] for r in kept] == ["first\nspans two lines", "third"]
    assert [json.loads(r["meta"])["source_id"] for r in kept] == ["1", "3"]


def test_text_quarantine_rows_name_the_line_for_line_and_paragraph_splits(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"short line\n\n" + b"y" * 300 + b"\nnext\n\nlast para\n")
    by_line = read(sources.SourceConfig(name="n", kind="text", paths=[str(path)], split="line"), max_doc_bytes=200)
    assert bad_lines(by_line) == [(3, "DocumentTooLarge")]
    assert [r["text"] for r in by_line if r["error"] is None] == ["short line", "next", "last para"]
    by_paragraph = read(sources.SourceConfig(name="n", kind="text", paths=[str(path)], split="paragraph"),
                        max_doc_bytes=200)
    assert bad_lines(by_paragraph) == [(3, "DocumentTooLarge")]  # the block starting on line 3
    assert [r["text"] for r in by_paragraph if r["error"] is None] == ["short line", "last para"]


def test_a_csv_field_of_1_mb_is_kept_and_so_are_the_rows_after_it(c4_records, tmp_path):
    long_text = " ".join(r["text"] for r in c4_records) * 20
    long_text = (long_text * (1_100_000 // len(long_text) + 1))[:1_100_000]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "text"])
    writer.writerow(["long", long_text])
    for record in c4_records[:3]:
        writer.writerow([record["id"], record["text"]])
    (tmp_path / "mixed.csv").write_text(buffer.getvalue())
    rows = read(sources.SourceConfig(name="c", kind="csv", paths=[str(tmp_path)]))
    assert bad_lines(rows) == []
    assert [r["text"] for r in rows] == [long_text] + [r["text"] for r in c4_records[:3]]


def test_documents_keep_the_source_records_id_and_named_meta_fields_by_default(c4_records, tmp_path):
    records = [{**r, "url": f"https://example.org/{i}", "license": "odc-by"} for i, r in enumerate(c4_records[:3])]
    (tmp_path / "web.jsonl").write_bytes(jsonl_bytes(records))
    rows = read(sources.SourceConfig(name="w", kind="jsonl", paths=[str(tmp_path)], meta_fields=["license"]))
    assert [json.loads(r["meta"]) for r in rows] == [{"source_id": r["id"], "license": "odc-by"} for r in records]
    no_ids = read(sources.SourceConfig(name="w", kind="jsonl", paths=[str(tmp_path)], id_field=None))
    assert [json.loads(r["meta"]) for r in no_ids] == [{}] * 3

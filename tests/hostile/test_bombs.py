"""Inputs that expand far past ``max_doc_bytes``: each is quarantined as oversize at the cost of
``max_doc_bytes`` of memory (peak RSS of the reading process < 512 MB), and the good records
around it are kept."""

from __future__ import annotations

import gzip
import json

from llmray.data.readers import html
from tests.hostile.builders import gzip_bomb
from tests.hostile.child import read_source
from tests.hostile.conftest import jsonl_bytes

GB2 = 2 << 30
MAX_RSS_MB = 512
LIMITS = {"max_doc_bytes": 10 << 20}


def documents(report: dict) -> list[dict]:
    return [r for r in report["rows"] if r["error"] is None]


def quarantined(report: dict) -> list[dict]:
    return [r for r in report["rows"] if r["error"] is not None]


def test_a_jsonl_gz_line_expanding_to_2_gb_is_quarantined_and_its_neighbours_kept(c4_records, tmp_path):
    before, after = c4_records[:3], c4_records[3:6]
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip_bomb(jsonl_bytes(before) + b'{"id": "bomb", "text": "', b"a", GB2,
                               b'"}\n' + jsonl_bytes(after)))
    report = read_source({"name": "web", "kind": "jsonl", "paths": [str(path)]}, LIMITS)
    assert [r["text"] for r in documents(report)] == [r["text"][:80] for r in before + after]
    assert [r["offset"] for r in documents(report)] == [0, 1, 2, 4, 5, 6]
    (bomb,) = quarantined(report)
    assert (bomb["offset"], bomb["error"]) == (4, "DocumentTooLarge")
    assert bomb["message"].startswith(f"{path}:4: line of {GB2 + 27} bytes > limit")
    assert report["peak_rss_mb"] < MAX_RSS_MB, report["peak_rss_mb"]


def test_a_warc_gz_record_expanding_to_2_gb_is_quarantined_and_the_other_records_kept(warc_path, tmp_path):
    members = list(html.gzip_members(warc_path, LIMITS["max_doc_bytes"]))
    clean = list(html.iter_warc(warc_path, "warc", "resiliparse", LIMITS["max_doc_bytes"]))
    body_prefix = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html><body><p>"
    headers = (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://bomb.example/\r\n"
               b"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000000>\r\n"
               b"Content-Type: application/http; msgtype=response\r\n"
               b"Content-Length: " + str(len(body_prefix) + GB2).encode() + b"\r\n\r\n")
    bomb = gzip_bomb(headers + body_prefix, b"x", GB2, b"\r\n\r\n")
    at = 2  # after the second member (the warcinfo record and the first request/response)
    raw = warc_path.read_bytes()
    split = members[at][0]
    path = tmp_path / "bomb.warc.gz"
    path.write_bytes(raw[:split] + bomb + raw[split:])
    report = read_source({"name": "cc", "kind": "warc", "paths": [str(path)]}, LIMITS)
    (oversize,) = quarantined(report)
    assert (oversize["offset"], oversize["error"]) == (split, "DocumentTooLarge")
    assert "expands to" in oversize["message"] and "max_doc_bytes" in oversize["message"]
    kept = [json.loads(r["meta"])["warc_record_id"] for r in documents(report)]
    assert kept == [d.meta["warc_record_id"] for d in clean]
    assert report["peak_rss_mb"] < MAX_RSS_MB, report["peak_rss_mb"]


def test_a_text_file_expanding_to_2_gb_is_quarantined_after_reading_only_the_limit(c4_records, tmp_path):
    (tmp_path / "bomb.txt.gz").write_bytes(gzip_bomb(b"It begins like prose. ", b" ", GB2, b"The end.\n"))
    (tmp_path / "story.txt.gz").write_bytes(gzip.compress(c4_records[0]["text"].encode()))
    report = read_source({"name": "books", "kind": "text", "paths": [str(tmp_path)]}, LIMITS)
    (oversize,) = quarantined(report)
    assert oversize["error"] == "DocumentTooLarge" and "read stopped there" in oversize["message"]
    assert [r["text"] for r in documents(report)] == [c4_records[0]["text"][:80]]
    assert report["seconds"] < 5 and report["peak_rss_mb"] < MAX_RSS_MB


def test_a_200_mb_jsonl_line_is_quarantined_and_the_lines_around_it_kept(c4_records, tmp_path):
    path = tmp_path / "long_line.jsonl"
    with open(path, "wb") as handle:
        handle.write(jsonl_bytes(c4_records[:2]))
        handle.write(b'{"id": "huge", "text": "' + b"word " * (40 << 20) + b'"}\n')
        handle.write(jsonl_bytes(c4_records[2:4]))
    report = read_source({"name": "web", "kind": "jsonl", "paths": [str(path)]}, LIMITS)
    assert [json.loads(r["meta"])["source_id"] for r in documents(report)] == ["c4-0", "c4-1", "c4-2", "c4-3"]
    (huge,) = quarantined(report)
    assert (huge["offset"], huge["error"]) == (3, "DocumentTooLarge")
    assert report["peak_rss_mb"] < MAX_RSS_MB, report["peak_rss_mb"]

"""Source readers: every kind reads, ids are stable, and every bad-input kind is quarantined
(path + offset) while every good record around it is kept."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmray.data import records
from llmray.data.readers import sources


def read_all(source: sources.SourceConfig, limits=None) -> list[dict]:
    limits = limits or sources.ReadLimits()
    rows = []
    for unit in sources.plan([source]):
        rows.extend(sources.read_unit(unit, source, limits))
    return rows


def docs(rows):
    return [r for r in rows if r["error"] is None]


def quarantined(rows):
    return [r for r in rows if r["error"] is not None]


def jsonl_lines(n, start=0):
    return [json.dumps({"text": f"good document {i}", "url": f"https://e.com/{i}"}).encode() for i in
            range(start, start + n)]


def test_jsonl_malformed_line_bad_utf8_and_non_object_are_quarantined(tmp_path):
    lines = jsonl_lines(2) + [b'{"text": "unterminated', b'{"text": "caf\xe9 \xff"}', b"[1, 2]",
                              b'{"other": "no text"}', b'{"text": "' + b"long " * 40 + b'caf\xe9"}',
                              ] + jsonl_lines(2, start=2)
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows = read_all(sources.SourceConfig(name="j", kind="jsonl", paths=[str(tmp_path)], url_field="url"))
    good = docs(rows)
    assert [d["text"] for d in good[:2] + good[3:]] == [f"good document {i}" for i in range(4)]
    assert good[2]["text"].endswith("caf\ufffd") and json.loads(good[2]["meta"]) == {"repaired_utf8": 1}
    assert [d["offset"] for d in good] == [0, 1, 6, 7, 8]
    assert docs(rows)[0]["url"] == "https://e.com/0"
    bad = quarantined(rows)
    assert [(q["offset"], q["error"]) for q in bad] == [(3, "JSONDecodeError"), (4, "InvalidUTF8"),
                                                        (5, "NotAnObject"), (6, "MissingField")]  # 1-based lines
    assert all(q["path"].endswith("a.jsonl") for q in bad)


def test_truncated_gzip_keeps_records_before_the_break(tmp_path):
    data = gzip.compress(b"\n".join(jsonl_lines(2000)) + b"\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    rows = read_all(sources.SourceConfig(name="j", kind="jsonl", paths=[str(tmp_path)]))
    good, bad = docs(rows), quarantined(rows)
    assert 0 < len(good) < 2000 and [d["text"] for d in good] == [f"good document {i}" for i in range(len(good))]
    assert len(bad) == 1 and bad[0]["error"] == "EOFError" and bad[0]["offset"] == len(good) + 1


def test_binary_invalid_utf8_too_large_and_empty_documents(tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x00binary")
    (tmp_path / "latin1.txt").write_bytes("d\xe9j\xe0 vu, na\xefve fa\xe7ade".encode("latin-1"))
    (tmp_path / "mostly_ok.txt").write_bytes(b"a" * 500 + b"\xff" + b"b" * 500)
    (tmp_path / "huge.txt").write_bytes(b"word " * (1 << 20))  # 5 MiB
    (tmp_path / "empty.txt").write_bytes(b"")
    limits = sources.ReadLimits(max_doc_bytes=1 << 20)
    rows = read_all(sources.SourceConfig(name="t", kind="text", paths=[str(tmp_path)]), limits)
    by_file = {r["path"].rsplit("/", 1)[1]: r for r in rows}
    assert by_file["binary.txt"]["error"] == "BinaryContent"
    assert by_file["latin1.txt"]["error"] == "InvalidUTF8"
    assert by_file["huge.txt"]["error"] == "DocumentTooLarge" and "max_doc_bytes" in by_file["huge.txt"]["message"]
    repaired = by_file["mostly_ok.txt"]
    assert repaired["error"] is None and "\ufffd" in repaired["text"]
    assert json.loads(repaired["meta"]) == {"repaired_utf8": 1}
    assert by_file["empty.txt"]["error"] is None and by_file["empty.txt"]["text"] == ""  # rejected later


def test_text_split_modes_and_gutenberg_markers(tmp_path):
    body = b"Header\r\n*** START OF THE BOOK ***\r\nPara one\r\nstill one\r\n\r\nPara two\r\n*** END OF IT\r\nlicense"
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(body))
    whole = docs(read_all(sources.SourceConfig(name="b", kind="text", paths=[str(tmp_path)], strip_gutenberg=True)))
    assert [d["text"] for d in whole] == ["Para one\r\nstill one\r\n\r\nPara two\r\n"]
    paragraphs = docs(read_all(sources.SourceConfig(name="b", kind="text", paths=[str(tmp_path)],
                                                    split="paragraph")))
    assert len(paragraphs) == 2 and paragraphs[1]["text"].startswith("Para two")
    lines = docs(read_all(sources.SourceConfig(name="b", kind="text", paths=[str(tmp_path)], split="line",
                                               max_docs_per_file=2)))
    assert [d["text"] for d in lines] == ["Header", "*** START OF THE BOOK ***"]


def test_parquet_csv_where_and_ids(tmp_path):
    table = pa.table({"body": ["first", "second", None], "label": ["a", "b", "a"], "uid": [7, 8, 9]})
    pq.write_table(table, tmp_path / "x.parquet")
    rows = read_all(sources.SourceConfig(name="p", kind="parquet", paths=[str(tmp_path)], text_field="body",
                                         id_field="uid", where={"label": ["a"]}))
    assert [(r["offset"], r["text"], r["error"]) for r in rows] == [(0, "first", None), (2, None, "NotText")]
    assert json.loads(rows[0]["meta"]) == {"source_id": "7"}
    (tmp_path / "y.csv").write_text('id,tweet,class\n1,"multi\nline",2\n2,skip me,1\n')
    rows = read_all(sources.SourceConfig(name="c", kind="csv", paths=[str(tmp_path / "y.csv")], text_field="tweet",
                                         where={"class": ["2"]}))
    assert [r["text"] for r in rows] == ["multi\nline"]
    assert rows[0]["id"] == records.document_id("c", "y.csv", 0)  # relative to the configured root


def test_ids_are_stable_when_the_corpus_moves(tmp_path):
    for root in (tmp_path / "one", tmp_path / "two"):
        root.mkdir()
        (root / "a.jsonl").write_bytes(b"\n".join(jsonl_lines(3)))
    ids = [[d["id"] for d in docs(read_all(sources.SourceConfig(name="s", kind="jsonl", paths=[str(root)])))]
           for root in (tmp_path / "one", tmp_path / "two")]
    assert ids[0] == ids[1] and len(set(ids[0])) == 3


def test_code_tree_skips_vendored_generated_and_unknown_files(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (tmp_path / "pkg" / "lib.rs").write_text("fn main() {}\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "dep.js").write_text("x")
    (tmp_path / "pkg" / "api_pb2.py").write_text("generated")
    (tmp_path / "pkg" / "logo.png").write_bytes(b"\x89PNG\x00")
    (tmp_path / "pkg" / "fake.py").write_bytes(b"\x00\x01binary")
    rows = read_all(sources.SourceConfig(name="code", kind="code", paths=[str(tmp_path)]))
    good = {r["path"].rsplit("/", 1)[1]: json.loads(r["meta"])["language"] for r in docs(rows)}
    assert good == {"mod.py": "python", "lib.rs": "rust"}
    assert [q["error"] for q in quarantined(rows)] == ["BinaryContent"]
    assert all(r["domain"] == "code" for r in docs(rows))


def test_latex_archive_members(tmp_path):
    tex = rb"\documentclass{article}\newcommand{\name}{Widget}\begin{document}\section{Intro}" \
          rb"The \name{} is \textbf{fast}~\cite{x}. % comment" b"\n\\end{document}"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in (("paper/main.tex", tex), ("paper/refs.bib", b"@article{x}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "p.tar.gz").write_bytes(buffer.getvalue())
    rows = docs(read_all(sources.SourceConfig(name="arxiv", kind="latex", paths=[str(tmp_path)])))
    assert len(rows) == 1 and rows[0]["text"] == "Intro\n\nThe Widget is fast."


def test_machine_source_and_optional_missing_sources(tmp_path, caplog):
    rows = read_all(sources.SourceConfig(name="m", kind="machine", machine_kinds=["pydoc_topics"],
                                         max_docs_per_file=3))
    assert len(docs(rows)) == 3 and all(r["domain"] == "text" for r in rows)
    missing = sources.SourceConfig(name="gone", kind="jsonl", paths=[str(tmp_path / "nope")], optional=True)
    assert sources.plan([missing]) == [] and "skipped (optional)" in caplog.text
    with pytest.raises(FileNotFoundError, match="optional: true"):
        sources.plan([sources.SourceConfig(name="gone", kind="jsonl", paths=[str(tmp_path / "nope")])])


def test_every_shared_data_kind_reads(shared_data):
    cases = [
        sources.SourceConfig(name="jsonl", kind="jsonl", paths=[str(shared_data / "web_cc_text")], max_files=1,
                             max_docs_per_file=5),
        sources.SourceConfig(name="csv", kind="csv", paths=[str(shared_data / "toxicity_davidson")],
                             text_field="tweet", max_docs_per_file=5),
        sources.SourceConfig(name="text", kind="text", paths=[str(shared_data / "wikipedia_sample")], split="line",
                             max_docs_per_file=2),
        sources.SourceConfig(name="warc", kind="warc", paths=[str(shared_data / "web_cc_warc" / "whirlwind.warc.gz")]),
        sources.SourceConfig(name="wet", kind="wet", paths=[str(shared_data / "web_cc_warc" / "whirlwind.warc.wet.gz")]),
        sources.SourceConfig(name="latex", kind="latex", paths=[str(shared_data / "arxiv_latex_sample")], max_files=1,
                             max_docs_per_file=1),
    ]
    for source in cases:
        rows = read_all(source)
        assert docs(rows) and not quarantined(rows), source.name
        assert all(len(d["text"]) > 20 for d in docs(rows)), source.name
    wet = docs(read_all(cases[4]))[0]
    assert wet["url"] == "https://an.wikipedia.org/wiki/Escopete" and "Escopete" in wet["text"]

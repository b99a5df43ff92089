"""The shared JSONL reader: numbering, gzip, and one policy for bad lines (reported, never dropped,
never stuck), and the callers that keep their own offsets and error codes on top of it."""

from __future__ import annotations

import gzip
import itertools
import json
import pickle
from pathlib import Path

import pytest

from llmray import jsonl
from llmray.align import records as align_records
from llmray.data.dedup import decontam
from llmray.data.readers import documents, sources
from llmray.data.filters import normalize
from llmray.eval.tasks import TaskFormatError, read_jsonl as read_task_records


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def lines_of(path: Path, **kwargs) -> list[jsonl.Line]:
    # Bounded, so a reader stuck on one line fails the test instead of hanging it.
    return list(itertools.islice(jsonl.read_lines(path, **kwargs), 1000))


def bad(line: jsonl.Line) -> jsonl.BadLine:
    assert isinstance(line.record, jsonl.BadLine), line
    return line.record


GOOD = b'{"a": 1}\n{"b": "caf\xc3\xa9"}\n{"c": [1, 2]}\n'


@pytest.mark.parametrize("name", ["good.jsonl", "good.jsonl.gz"])
def test_good_lines_come_with_1_based_numbers_and_byte_offsets(tmp_path, name):
    path = write(tmp_path / name, GOOD)
    lines = lines_of(path)
    assert [line.record for line in lines] == [{"a": 1}, {"b": "café"}, {"c": [1, 2]}]
    assert [line.number for line in lines] == [1, 2, 3]
    assert [line.index for line in lines] == [0, 1, 2]
    assert [line.byte_offset for line in lines] == [0, 9, 24]  # of the decompressed bytes
    assert all(line.repaired == 0 for line in lines)


def test_gzip_is_chosen_by_the_name(tmp_path):
    plain = write(tmp_path / "plain.jsonl", GOOD)
    packed = write(tmp_path / "packed.jsonl.gz", GOOD)
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and lines_of(packed) == lines_of(plain)
    # Compressed bytes under a plain name are read as they are: every line is bad, none skipped.
    (tmp_path / "misnamed.jsonl").write_bytes(packed.read_bytes())
    assert all(isinstance(line.record, jsonl.BadLine) for line in lines_of(tmp_path / "misnamed.jsonl"))


def test_a_malformed_line_in_the_middle_is_reported_and_the_others_kept(tmp_path):
    path = write(tmp_path / "m.jsonl", b'{"a": 1}\n{"a": 2}\n{"a": \n{"a": 4}\n')
    lines = lines_of(path)
    assert [line.record for line in lines if not isinstance(line.record, jsonl.BadLine)] == \
        [{"a": 1}, {"a": 2}, {"a": 4}]
    error = bad(lines[2])
    assert (lines[2].number, error.number, error.reason) == (3, 3, jsonl.INVALID_JSON)
    assert str(error) == f"{path}:3: not valid JSON (Expecting value at column 7)"
    assert error.path == str(path) and error.detail.startswith("not valid JSON")


@pytest.mark.parametrize("value, kind", [(b"[1, 2]", "list"), (b'"text"', "str"), (b"7", "int"), (b"null", "null")])
def test_a_line_that_is_not_an_object_is_reported(tmp_path, value, kind):
    path = write(tmp_path / "n.jsonl", b'{"a": 1}\n' + value + b'\n{"a": 3}\n')
    lines = lines_of(path)
    assert [line.number for line in lines] == [1, 2, 3]
    assert bad(lines[1]).reason == jsonl.NOT_AN_OBJECT
    assert str(lines[1].record) == f"{path}:2: expected a JSON object, got {kind}"
    # ...unless any JSON value is a record (decontamination indexes every string of any layout).
    assert [line.record for line in lines_of(path, require_object=False)][1] == \
        json.loads(value)


@pytest.mark.parametrize("name", ["cut.jsonl", "cut.jsonl.gz"])
def test_a_file_cut_inside_a_multibyte_character_ends_with_that_line_reported(tmp_path, name):
    path = write(tmp_path / name, b'{"a": 1}\n{"a": "caf\xc3')  # é is \xc3\xa9: cut after \xc3
    lines = lines_of(path)
    assert len(lines) == 2 and lines[0].record == {"a": 1}
    assert bad(lines[1]).reason == jsonl.INVALID_UTF8
    assert str(lines[1].record) == f"{path}:2: not valid UTF-8 (unexpected end of data at byte 11)"


def test_an_invalid_byte_mid_file_affects_only_its_line(tmp_path):
    path = write(tmp_path / "b.jsonl", b'{"a": "x"}\n{"a": "\xff"}\n{"a": "caf\xc3\xa9"}\n')
    lines = lines_of(path)
    assert [line.number for line in lines] == [1, 2, 3]
    assert lines[0].record == {"a": "x"} and lines[2].record == {"a": "café"}
    assert bad(lines[1]).reason == jsonl.INVALID_UTF8 and str(lines[1].record).startswith(f"{path}:2: ")
    # A repairing decoder (curate's) turns the bad byte into U+FFFD and says how many it replaced.
    repaired = lines_of(path, decode=normalize.decode)
    assert repaired[1].record == {"a": "\ufffd"} and [line.repaired for line in repaired] == [0, 1, 0]


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write(tmp_path / "blank.jsonl", b'\n{"a": 1}\r\n  \t\n\r\n{"a": 2}\n\n')
    lines = lines_of(path)
    assert [(line.number, line.index, line.byte_offset, line.record) for line in lines] == \
        [(2, 1, 1, {"a": 1}), (5, 4, 17, {"a": 2})]


def test_a_last_line_without_newline_and_a_byte_order_mark_are_read(tmp_path):
    path = write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"a": 1}\n{"a": 2}')
    assert [(line.number, line.byte_offset, line.record) for line in lines_of(path)] == \
        [(1, 0, {"a": 1}), (2, 12, {"a": 2})]


def test_deep_nesting_is_a_bad_line_not_a_crash(tmp_path):
    path = write(tmp_path / "deep.jsonl", b"[" * 100_000 + b"]" * 100_000 + b'\n{"a": 1}\n')
    lines = lines_of(path)
    assert bad(lines[0]).reason == jsonl.INVALID_JSON and lines[1].record == {"a": 1}


def test_bad_line_survives_pickling():
    error = jsonl.BadLine("p.jsonl", 4, jsonl.INVALID_JSON, "not valid JSON (x)")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.number, copy.reason, copy.detail, str(copy)) == \
        ("p.jsonl", 4, jsonl.INVALID_JSON, "not valid JSON (x)", "p.jsonl:4: not valid JSON (x)")


# --- callers: each keeps its own offset and codes, every message names the 1-based line ---

MIXED = b'{"text": "one"}\n\n{"text": \n[1]\n{"text": "five"}\n'


def test_curate_documents_keep_0_based_line_indexes_quarantine_rows_and_messages_name_the_line(tmp_path):
    path = write(tmp_path / "c.jsonl", MIXED)
    source = sources.SourceConfig(name="c", kind="jsonl", paths=[str(path)])
    rows = [r for unit in sources.plan([source]) for r in sources.read_unit(unit, source, sources.ReadLimits())]
    assert [(r["offset"], r["error"]) for r in rows] == \
        [(0, None), (3, "JSONDecodeError"), (4, "NotAnObject"), (4, None)]
    assert rows[1]["message"].startswith(f"{path}:3: not valid JSON")
    assert rows[2]["message"] == f"{path}:4: expected a JSON object, got list"


def test_document_ids_use_the_0_based_line_index_and_bad_records_the_line(tmp_path):
    write(tmp_path / "d.jsonl", MIXED)
    batch = next(documents.read_batches(tmp_path / "d.jsonl", tmp_path))
    assert batch["offset"] == [0, 3, 4, 4]
    assert batch["id"][3] == documents.derived_id("d.jsonl", 4)
    assert batch["error"] == [None, "JSONDecodeError", "TypeError", None]
    assert batch["message"][1].startswith("d.jsonl:3: not valid JSON")
    assert batch["message"][2] == "d.jsonl:4: expected a JSON object, got list"


def test_alignment_reader_quarantines_with_the_line_and_does_not_loop_on_a_cut_file(tmp_path):
    path = write(tmp_path / "a.jsonl", MIXED + b'{"text": "caf\xc3')
    items = list(itertools.islice(align_records.read_jsonl(path), 100))
    assert [(n, r.error if isinstance(r, align_records.Quarantined) else r) for n, r in items] == [
        (1, {"text": "one"}), (3, "invalid_json"), (4, "wrong_type"), (5, {"text": "five"}), (6, "invalid_utf8")]
    assert [r.offset for _, r in items if isinstance(r, align_records.Quarantined)] == [3, 4, 6]
    assert items[4][1].message.startswith(f"{path}:6: not valid UTF-8")


def test_eval_and_decontamination_readers_raise_naming_the_line(tmp_path):
    path = write(tmp_path / "t.jsonl", b'{"q": "a"}\n\n{"q": "\xff"}\n')
    with pytest.raises(TaskFormatError, match=rf"^{path}:3: not valid UTF-8"):
        list(read_task_records(path))
    with pytest.raises(ValueError, match=rf"^{path}:3: not valid UTF-8"):
        decontam.read_task_texts(path)
    strings = write(tmp_path / "s.jsonl", b'"a prompt"\n{"q": ["b", "c"]}\n')
    assert decontam.read_task_texts(strings) == ["a prompt", "b", "c"]

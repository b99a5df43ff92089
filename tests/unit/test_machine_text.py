"""The machine-local demo corpus: found on any Linux machine with Python, stable, text only."""

from __future__ import annotations

import gzip

import pytest

from llmray.data.readers import errors, machine_text

MAX_BYTES = 10 << 20


def test_python_sources_and_pydoc_topics_always_exist():
    files = machine_text.discover(["python_stdlib", "pydoc_topics"], max_files_per_kind=50)
    kinds = {f.kind for f in files}
    assert kinds == {"python_stdlib", "pydoc_topics"}
    assert files == machine_text.discover(["python_stdlib", "pydoc_topics"], max_files_per_kind=50)
    topics = next(f for f in files if f.kind == "pydoc_topics")
    documents = list(machine_text.read_documents(topics, MAX_BYTES))
    assert len(documents) > 50
    assert any("assignment statement" in text.lower() for _, text, _ in documents)
    code = next(f for f in files if f.kind == "python_stdlib")
    (_, text, meta), = machine_text.read_documents(code, MAX_BYTES)
    assert meta["path"] == code.path and len(text) > 0


def test_unknown_kind_is_rejected_with_choices():
    with pytest.raises(ValueError, match=r"unknown machine-text kind\(s\) \['books'\]"):
        machine_text.discover(["books"])


def test_binary_file_raises_so_caller_can_quarantine(tmp_path):
    path = tmp_path / "blob.gz"
    path.write_bytes(gzip.compress(b"\x7fELF\0\0\0binary"))
    with pytest.raises(errors.DataError, match="is binary, expected text"):
        list(machine_text.read_documents(machine_text.MachineFile(str(path), "doc"), MAX_BYTES))


def test_a_file_that_expands_past_the_limit_is_refused_after_reading_the_limit(tmp_path):
    path = tmp_path / "NEWS.gz"
    path.write_bytes(gzip.compress(b"news line\n" * 10_000))
    with pytest.raises(errors.RecordTooLarge, match="more than 1000 bytes") as raised:
        list(machine_text.read_documents(machine_text.MachineFile(str(path), "doc"), 1000))
    assert raised.value.size == 1001


def test_strip_roff_keeps_text_and_drops_markup():
    roff = '.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\nMore text.\n'
    text = machine_text.strip_roff(roff)
    assert "comment" not in text and "\\f" not in text and ".SH" not in text
    assert "NAME" in text and "ls - list directory contents" in text and "More text." in text

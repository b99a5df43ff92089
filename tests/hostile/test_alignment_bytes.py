"""SFT and DPO data cut inside a UTF-8 character (a truncated download) or with a bad byte in
the middle: the reader ends, exactly the damaged line is quarantined, every other line is kept."""

from __future__ import annotations

import gzip
import json

import pytest

from llmray.align import conversations, preferences

GOOD_LINES = 6


def real_lines(path, n: int) -> list[bytes]:
    with gzip.open(path, "rb") as handle:
        return [next(handle) for _ in range(n)]


@pytest.fixture
def sft_lines(shared_data) -> list[bytes]:
    lines = real_lines(shared_data / "gsm8k" / "train.jsonl.gz", GOOD_LINES)
    extra = {"question": "A café sells 3 crêpes — how many in a week?", "answer": "3 * 7 = 21\n#### 21"}
    return lines + [json.dumps(extra, ensure_ascii=False).encode() + b"\n"]


@pytest.fixture
def dpo_lines(shared_data) -> list[bytes]:
    lines = real_lines(shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz", GOOD_LINES + 1)
    assert "’".encode() in lines[-1]
    return lines


def cut_inside_a_character(line: bytes) -> bytes:
    """``line`` up to the middle of its last multi-byte character."""
    lead = max(line.rfind(b"\xc3"), line.rfind(b"\xe2"))
    assert lead > 0
    return line[:lead + 1]


def same_name(tmp_path) -> tuple:
    """Two files of one name (ids are made of it): the intact data and the damaged copy."""
    (tmp_path / "intact").mkdir()
    (tmp_path / "damaged").mkdir()
    return tmp_path / "intact" / "data.jsonl", tmp_path / "damaged" / "data.jsonl"


def items(read_source, source) -> tuple[list, list]:
    read = list(read_source(source))
    bad = [(q.offset, q.error) for q in read if isinstance(q, conversations.Quarantined)]
    return [item for item in read if not isinstance(item, conversations.Quarantined)], bad


CASES = {
    "sft": (conversations.read_source, lambda path: conversations.SftSource(kind="gsm8k", path=str(path))),
    "dpo": (preferences.read_source, lambda path: preferences.PreferenceSource(kind="hh_rlhf", path=str(path))),
}


@pytest.mark.parametrize("stage", CASES)
def test_a_file_ending_inside_a_utf8_character_loses_only_its_last_line(stage, sft_lines, dpo_lines, tmp_path):
    read_source, make = CASES[stage]
    lines = sft_lines if stage == "sft" else dpo_lines
    whole, cut = same_name(tmp_path)
    whole.write_bytes(b"".join(lines[:GOOD_LINES]))
    cut.write_bytes(b"".join(lines[:GOOD_LINES]) + cut_inside_a_character(lines[GOOD_LINES]))
    expected, _ = items(read_source, make(whole))
    kept, bad = items(read_source, make(cut))
    assert len(expected) == GOOD_LINES and kept == expected
    assert bad == [(GOOD_LINES + 1, "invalid_utf8")]


@pytest.mark.parametrize("stage", CASES)
def test_a_bad_byte_mid_file_loses_only_its_line(stage, sft_lines, dpo_lines, tmp_path):
    read_source, make = CASES[stage]
    lines = list(sft_lines if stage == "sft" else dpo_lines)[:GOOD_LINES]
    whole, damaged = same_name(tmp_path)
    whole.write_bytes(b"".join(lines))
    middle = lines[2]
    lines[2] = middle[:40] + b"\xff" + middle[41:]
    damaged.write_bytes(b"".join(lines))
    expected, _ = items(read_source, make(whole))
    kept, bad = items(read_source, make(damaged))
    assert bad == [(3, "invalid_utf8")]
    assert kept == expected[:2] + expected[3:]

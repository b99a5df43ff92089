"""Property: random truncations and byte flips of real JSONL, JSONL.gz and WARC.gz files never
make the curate reader crash, hang or raise, and every record that lies wholly before the first
damaged byte comes out exactly as it does from the intact file.

"Wholly before" per format: a JSONL line whose bytes (newline included) end before the damage;
for JSONL.gz, a line inside what zlib can decompress from the bytes before the damage; for
WARC.gz, a record whose gzip member ends before the damage.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmray.data.readers import html, sources
from tests.hostile.conftest import jsonl_bytes

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def damage(draw, size: int) -> tuple[str, int, list[tuple[int, int]]]:
    """``("cut", position, [])`` or ``("flip", first position, [(position, bit mask), ...])``."""
    if draw(st.booleans()):
        return "cut", draw(st.integers(0, size - 1)), []
    flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)), min_size=1, max_size=3))
    return "flip", min(p for p, _ in flips), [(p, 1 << bit) for p, bit in flips]


def damaged(data: bytes, how: str, flips: list[tuple[int, int]], first: int) -> bytes:
    if how == "cut":
        return data[:first]
    data = bytearray(data)
    for position, mask in flips:
        data[position] ^= mask
    return bytes(data)


def read(path: Path, kind: str) -> list[dict]:
    source = sources.SourceConfig(name="s", kind=kind, paths=[str(path)])
    return [r for unit in sources.plan([source]) for r in sources.read_unit(unit, source, sources.ReadLimits())]


def check(original: bytes, name: str, kind: str, tmp_path: Path, change, intact_before) -> None:
    """Read the intact and the damaged file under the same name; the rows ``intact_before(first)``
    selects from the intact read must all be in the damaged read, unchanged."""
    how, first, flips = change
    (tmp_path / "intact").mkdir(exist_ok=True)
    (tmp_path / "damaged").mkdir(exist_ok=True)
    (tmp_path / "intact" / name).write_bytes(original)
    (tmp_path / "damaged" / name).write_bytes(damaged(original, how, flips, first))
    intact = [r for r in read(tmp_path / "intact" / name, kind) if r["error"] is None]
    after = read(tmp_path / "damaged" / name, kind)  # must not raise
    expected = {r["id"]: {**r, "path": None} for r in intact_before(intact, first)}
    got = {r["id"]: {**r, "path": None} for r in after if r["id"] in expected}
    assert got == expected


@pytest.fixture(scope="module")
def jsonl_data(c4_records) -> bytes:
    return jsonl_bytes(c4_records[:12])


def line_indexes_ending_before(data: bytes, position: int) -> set[int]:
    ends = [i for i, byte in enumerate(data) if byte == ord("\n")]
    return {index for index, end in enumerate(ends) if end < position}


@SETTINGS
@given(data=st.data())
def test_damaged_jsonl(jsonl_data, tmp_path, data):
    change = data.draw(damage(len(jsonl_data)))
    check(jsonl_data, "web.jsonl", "jsonl", tmp_path, change,
          lambda rows, first: [r for r in rows if r["offset"] in line_indexes_ending_before(jsonl_data, first)])


def decompressible_prefix(data: bytes) -> bytes:
    """What zlib yields from ``data`` (gzip members in a row) before it stops or fails."""
    out, rest = [], data
    while rest:
        inflater = zlib.decompressobj(wbits=31)
        for position in range(len(rest)):
            try:
                out.append(inflater.decompress(rest[position:position + 1]))
            except zlib.error:
                return b"".join(out)
            if inflater.eof:
                break
        if not inflater.eof:
            break
        rest = inflater.unused_data + rest[position + 1:]
    return b"".join(out)


@SETTINGS
@given(data=st.data())
def test_damaged_jsonl_gz(jsonl_data, tmp_path, data):
    half = len(jsonl_data) // 2
    cut = jsonl_data.rfind(b"\n", 0, half) + 1
    packed = gzip.compress(jsonl_data[:cut]) + gzip.compress(jsonl_data[cut:])  # two members, as `cat` makes
    change = data.draw(damage(len(packed)))

    def before(rows, first):
        readable = decompressible_prefix(packed[:first])
        return [r for r in rows if r["offset"] in line_indexes_ending_before(readable, len(readable))]

    check(packed, "web.jsonl.gz", "jsonl", tmp_path, change, before)


@SETTINGS
@given(data=st.data())
def test_damaged_warc_gz(warc_path, tmp_path, data):
    original = warc_path.read_bytes()
    ends = {}  # member offset -> compressed end
    members = [offset for offset, _ in html.gzip_members(warc_path, 10 << 20)]
    for offset, following in zip(members, members[1:] + [len(original)]):
        ends[offset] = following
    change = data.draw(damage(len(original)))
    check(original, "crawl.warc.gz", "warc", tmp_path, change,
          lambda rows, first: [r for r in rows if ends[r["offset"]] <= first])

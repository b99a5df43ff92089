"""The one JSON Lines reader: ``.jsonl`` files, gzip-compressed when the name ends in ``.gz``.

Curate, documents, alignment data, evaluation tasks and decontamination all read JSONL through
:func:`read_lines`, so line numbers, blank lines and bad lines mean the same everywhere:

* **Numbering.** A :class:`Line` carries the 1-based physical ``number`` (blank lines count, as
  in an editor) that every message uses, the ``byte_offset`` of its first byte in the
  decompressed file, and ``index`` (``number - 1``), the 0-based position that curate and
  document ids are made of; callers store whichever value their contract names.
* **Error policy.** A line that is not valid UTF-8, not valid JSON, not a JSON object, or longer
  than ``max_line_bytes`` comes out as a :class:`BadLine` in place of the record, whose ``str()`` is
  ``path:number: what is wrong``; it is never skipped and never ends the file, so the caller
  decides to quarantine it or raise it. Blank lines (ASCII whitespace only) are skipped.
  Stream errors (a missing file, a truncated or damaged ``.gz``) are raised after every line
  before the damage was delivered: they end the file, not a line.
  Only decontamination, which indexes every string of a line whatever its layout, passes
  ``require_object=False`` to accept any JSON value.
* **Bytes first.** The file is split on ``\\n`` as bytes and each line decoded on its own, so a
  bad byte affects only its line and a file cut inside a multi-byte character ends with one bad
  line. A caller that repairs bad bytes instead passes ``decode`` and gets the count back in
  ``Line.repaired``. A UTF-8 byte-order mark at the start of the file is ignored.
* **Bounded.** Lines come from :func:`llmray.byte_streams.bounded_lines`: at most
  ``max_line_bytes + 1`` bytes of a line are ever in memory, so a 1 GB line is skipped, not parsed.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Any, Callable, Iterator, NamedTuple

from llmray import byte_streams

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
TOO_LARGE = "too_large"
DEFAULT_MAX_LINE_BYTES = 256 << 20  # callers with a size contract (curate's max_doc_bytes) pass theirs

Decoder = Callable[[bytes], tuple[str, int]]


class BadLine(ValueError):
    """A line that is not a record; ``reason`` is one of :data:`INVALID_UTF8`,
    :data:`INVALID_JSON`, :data:`NOT_AN_OBJECT`, :data:`TOO_LARGE`; ``detail`` says what is wrong."""

    def __init__(self, path: str, number: int, reason: str, detail: str):
        super().__init__(f"{path}:{number}: {detail}")
        self.path = path
        self.number = number
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        return BadLine, (self.path, self.number, self.reason, self.detail)


class Line(NamedTuple):
    """One non-blank line: its record (a dict) or the :class:`BadLine` it is instead."""

    number: int  # 1-based line number
    byte_offset: int  # of the line's first byte in the decompressed file
    record: dict | Any | BadLine  # any JSON value only with require_object=False
    repaired: int = 0  # sequences ``decode`` replaced (0 with the default strict decoding)

    @property
    def index(self) -> int:
        """0-based line index (blank lines counted)."""
        return self.number - 1


def read_lines(path: str | os.PathLike, *, decode: Decoder | None = None, require_object: bool = True,
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Line]:
    """Every non-blank line of a JSONL(.gz) file, in file order.

    ``decode`` turns a line's bytes into ``(text, repaired)``; by default a line that is not
    strict UTF-8 is a :class:`BadLine`. ``require_object=False`` accepts any JSON value. A line
    longer than ``max_line_bytes`` (newline excluded) is a :class:`BadLine` of reason
    :data:`TOO_LARGE`, read no further than its first ``max_line_bytes + 1`` bytes.
    """
    name = os.fspath(path)
    with byte_streams.open_binary(path) as handle:
        for line in byte_streams.bounded_lines(handle, max_line_bytes):
            raw = line.data
            if raw is None:
                yield Line(line.number, line.offset, BadLine(
                    name, line.number, TOO_LARGE, f"line of {line.size} bytes > limit {max_line_bytes}"))
                continue
            if line.number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if raw.strip():
                yield _parse(name, line.number, line.offset, raw, decode, require_object)


def _parse(name: str, number: int, offset: int, raw: bytes, decode: Decoder | None, require_object: bool
           ) -> Line:
    repaired = 0
    if decode is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Line(number, offset, BadLine(name, number, INVALID_UTF8,
                                                f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})"))
    else:
        text, repaired = decode(raw)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        column = min(exc.pos, len(text.rstrip("\r\n"))) + 1  # not exc.colno: it counts the line's own \n
        bad = BadLine(name, number, INVALID_JSON, f"not valid JSON ({exc.msg} at column {column})")
        return Line(number, offset, bad, repaired)
    except RecursionError:
        return Line(number, offset, BadLine(name, number, INVALID_JSON, "not valid JSON (nested too deeply)"),
                    repaired)
    if require_object and not isinstance(record, dict):
        bad = BadLine(name, number, NOT_AN_OBJECT, f"expected a JSON object, got {_type_name(record)}")
        return Line(number, offset, bad, repaired)
    return Line(number, offset, record, repaired)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__

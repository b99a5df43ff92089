"""Reading untrusted files with bounded memory: every read has a limit, damage costs only itself.

Every reader of raw data (JSONL, text, CSV, HTML, code, LaTeX) opens files here, so one set of
rules holds for all of them:

* **Nothing unbounded.** :func:`read_at_most` reads ``limit + 1`` bytes of a file at most, and
  :func:`bounded_lines` returns each line cut at ``limit + 1`` bytes (the rest of an oversize
  line is read in chunks and dropped, its size counted), so a 2 GB line or a gzip bomb costs
  ``limit`` bytes of memory, not the decompressed size.
* **Damage costs what follows it, not what precedes it.** ``.gz`` files are decompressed by
  :class:`GzipReader`, which hands out everything that decompressed before a damaged byte
  (the standard ``gzip`` module drops the whole read chunk around the damage) and raises the
  error on the next read, so every line wholly before the damage is delivered. Multi-member
  files (concatenated gzip) are read to the end; the CRC of each member is checked.

The errors raised are data errors (``OSError``/``EOFError``/``zlib.error``), which readers
quarantine; see :mod:`llmray.data.readers.errors`.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import IO, Iterator, NamedTuple

from llmray import storage

_CHUNK = 1 << 16  # compressed bytes fed to zlib per step
_SKIP_CHUNK = 1 << 20  # bytes read per step while skipping the rest of an oversize line
_BUFFER = 1 << 18  # decompressed bytes buffered per read


class GzipReader(io.RawIOBase):
    """Raw reader of a (multi-member) gzip file that keeps the output produced before damage.

    Output is produced with ``max_length``, so memory stays at the caller's read size however
    much a member expands. On a zlib error the failing input is decompressed again from a copy
    of the decompressor one byte at a time, so the output returned stops exactly where zlib
    noticed the damage; the error itself is raised by the following read.
    """

    def __init__(self, raw: IO[bytes], name: str = "") -> None:
        super().__init__()
        self._raw, self.name = raw, name
        self._inflater = zlib.decompressobj(wbits=31)
        self._pending = b""  # compressed input not yet consumed
        self._error: BaseException | None = None
        self._done = False
        self._member_started = False  # bytes of the current member were fed (truncation check)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()

    def _read(self, size: int) -> bytes:
        while True:
            if self._error is not None:
                raise self._error
            if self._done or size == 0:
                return b""
            if not self._pending:
                self._pending = self._raw.read(_CHUNK)
                if not self._pending:
                    self._end_of_file()
                    continue
            data = self._inflate(size)
            if self._inflater.eof:
                self._next_member()
            if data:
                return data

    def _inflate(self, size: int) -> bytes:
        """Decompress from ``_pending`` (at most ``size`` bytes out); ``_pending`` keeps the rest."""
        if not self._member_started:
            self._pending = self._pending.lstrip(b"\0")  # zero padding between members, as gzip allows
            if not self._pending:
                return b""
        self._member_started = True
        saved = self._inflater.copy()
        try:
            data = self._inflater.decompress(self._pending, size)
        except zlib.error:
            self._inflater = saved
            return self._salvage(size)
        self._pending = self._rest_after()
        return data

    def _salvage(self, size: int) -> bytes:
        """The output of ``_pending`` up to the damaged byte; the error waits for the next read."""
        chunk, parts, produced = self._pending, [], 0
        for position in range(len(chunk)):
            try:
                part = self._inflater.decompress(chunk[position:position + 1], size - produced)
            except zlib.error as exc:
                self._error = zlib.error(f"{self.name}: damaged gzip data: {exc}")
                self._pending = b""
                break
            parts.append(part)
            produced += len(part)
            if self._inflater.eof or self._inflater.unconsumed_tail or produced >= size:
                self._pending = self._rest_after() + chunk[position + 1:]
                break
        return b"".join(parts)

    def _rest_after(self) -> bytes:
        """Input the last decompress call left; at a member's end zlib moves it to unused_data,
        which :meth:`_next_member` takes."""
        return b"" if self._inflater.eof else self._inflater.unconsumed_tail

    def _next_member(self) -> None:
        self._pending = self._inflater.unused_data + self._pending
        self._inflater = zlib.decompressobj(wbits=31)
        self._member_started = False

    def _end_of_file(self) -> None:
        if self._member_started:
            self._error = EOFError(f"{self.name}: truncated gzip: the file ends inside a member")
        self._done = True


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """``path`` (a local path or a URI, see :mod:`llmray.storage`) opened for buffered reading of
    bytes, decompressed when its name ends in ``.gz``."""
    name = os.fspath(path)
    raw = storage.open_input(name)
    if storage.is_remote(name):
        raw = io.BufferedReader(raw, buffer_size=_BUFFER)
    if not name.endswith(".gz"):
        return raw
    return io.BufferedReader(GzipReader(raw, name), buffer_size=_BUFFER)


def read_at_most(handle: IO[bytes], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``handle``: a result longer than ``limit`` means "too large"."""
    return handle.read(limit + 1)


class BoundedLine(NamedTuple):
    """One physical line: its bytes (with the newline), or ``None`` when it is longer than the limit."""

    number: int  # 1-based
    offset: int  # of its first byte
    data: bytes | None
    size: int  # bytes of the whole line, newline included


def bounded_lines(handle: IO[bytes], limit: int) -> Iterator[BoundedLine]:
    """Every line of ``handle``; a line over ``limit`` bytes (newline excluded) comes with ``data``
    None after its remainder is skipped, so at most ``limit + 1`` bytes of a line are in memory."""
    offset, number = 0, 0
    while True:
        data = handle.readline(limit + 2)  # limit bytes + newline, and one more to detect "too large"
        if not data:
            return
        number += 1
        size = len(data)
        if len(data.rstrip(b"\r\n")) > limit:
            while not data.endswith(b"\n"):
                data = handle.readline(_SKIP_CHUNK)
                if not data:
                    break
                size += len(data)
            data = None
        yield BoundedLine(number, offset, data, size)
        offset += size

"""Hostile inputs built at test time from a few bytes: nothing large is committed or kept.

A gzip bomb is written without compressing its gigabytes: after a full flush deflate starts
afresh, so the compressed form of a 1 MiB block of one repeated byte is the same bytes every
time and is simply repeated; the gzip header and trailer (CRC-32 and size of the whole
content) are written by hand.
"""

from __future__ import annotations

import struct
import zlib

_BLOCK = 1 << 20
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, no mtime, max compression


def gzip_bomb(prefix: bytes, filler: bytes, filler_bytes: int, suffix: bytes) -> bytes:
    """One gzip member that expands to ``prefix + filler * n + suffix`` (``filler_bytes`` of filler,
    a multiple of 1 MiB) while its own size stays a few MiB."""
    assert len(filler) == 1 and filler_bytes % _BLOCK == 0
    block = filler * _BLOCK
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    repeated = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert again == repeated, "deflate output after a full flush is expected to repeat"
    tail = deflate.compress(suffix) + deflate.flush(zlib.Z_FINISH)
    blocks = filler_bytes // _BLOCK
    crc = zlib.crc32(prefix)
    for _ in range(blocks):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(suffix, crc)
    size = len(prefix) + filler_bytes + len(suffix)
    return _GZIP_HEADER + head + repeated * blocks + tail + struct.pack("<II", crc, size & 0xFFFFFFFF)

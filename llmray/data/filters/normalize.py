"""Text normalization: decode with UTF-8 repair, Unicode NFC, control characters, whitespace.

Design choices:

* **Repair, then judge**: bytes are decoded as UTF-8 with invalid sequences replaced by U+FFFD
  (:func:`decode`). A record with a few bad bytes (a mis-encoded quote) is kept, repaired; a
  record where more than ``max_invalid_fraction`` of the characters are invalid is not text
  (binary, wrong codec) and the caller quarantines it.
* **NFC** so that the same visible text has one code-point sequence (dedup and tokenizer both
  depend on that); NFKC is not used because it rewrites meaningful characters (superscripts,
  ligatures in code, full-width punctuation in CJK).
* **Control characters** (C0/C1 except tab and newline, plus zero-width and BOM characters) are
  removed; carriage returns become newlines; Unicode space separators become a plain space.
* **Whitespace**: trailing spaces on each line are dropped, runs of 3+ newlines become one blank
  line, and the document is stripped. Indentation is kept (code and poetry need it).

Pure Python + ``re``; str.translate with a precomputed table does the per-character work.
"""

from __future__ import annotations

import re
import unicodedata

REPLACEMENT = "\ufffd"


def _build_translation() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for code in list(range(0x00, 0x20)) + list(range(0x7F, 0xA0)):
        if chr(code) not in "\t\n\r":
            table[code] = None
    for code in (0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD):  # zero-width, BOM, soft hyphen
        table[code] = None
    for code in (0x00A0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007,
                 0x2008, 0x2009, 0x200A, 0x202F, 0x205F, 0x3000):  # Unicode category Zs except ' '
        table[code] = " "
    for code in (0x2028, 0x2029, 0x0B, 0x0C):  # line/paragraph separators, VT, FF
        table[code] = "\n"
    return table


_TRANSLATION = _build_translation()
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 decode with repair; returns ``(text, number of replaced invalid sequences)``."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count(REPLACEMENT) - data.count(REPLACEMENT.encode())


def repair_surrogates(text: str) -> tuple[str, int]:
    """Replace lone surrogates (possible in JSON ``\\ud800`` escapes) by U+FFFD; returns the count."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        surrogates = sum(1 for c in text if 0xD800 <= ord(c) <= 0xDFFF)
        return "".join(REPLACEMENT if 0xD800 <= ord(c) <= 0xDFFF else c for c in text), surrogates


def invalid_fraction(text: str, invalid: int) -> float:
    return invalid / max(1, len(text))


def normalize(text: str) -> str:
    """NFC, control-character and whitespace cleanup (idempotent: normalize(normalize(x)) == normalize(x))."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_TRANSLATION)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip("\n").rstrip()

"""Cross-document boilerplate lines: lines that appear in more than K documents are removed.

Cookie banners, navigation menus, license headers and "share this" footers repeat verbatim
across many pages of a crawl; one copy of the page they decorate is useful, the line is not.
A line is compared after lower-casing and collapsing whitespace; lines shorter than
``min_chars`` (blank lines, "}", "Home") are never counted or removed, so code and short
headings survive. Counting is distributed (see :mod:`llmray.data.dedup`): each batch contributes
every line hash *once per document*, partial counts are summed per hash partition, and only the
hashes over the threshold come back, as one sorted uint64 array. A document that loses lines and
is left with fewer than ``min_words`` words (:func:`too_short`) is rejected rather than kept as a
fragment.
"""

from __future__ import annotations

import numpy as np
import xxhash


def line_key(line: str) -> str:
    return " ".join(line.lower().split())


def line_hash(key: str) -> int:
    return xxhash.xxh3_64_intdigest(key.encode("utf-8"))


def document_line_hashes(texts: list[str], min_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct hashes of countable lines in this batch and in how many documents each occurs."""
    per_document = []
    for text in texts:
        keys = {line_key(line) for line in text.split("\n")}
        per_document.extend(line_hash(k) for k in keys if len(k) >= min_chars)
    hashes, counts = np.unique(np.array(per_document, dtype=np.uint64), return_counts=True)
    return hashes, counts.astype(np.int64)


def sum_counts(hashes: np.ndarray, counts: np.ndarray, more_than: int) -> np.ndarray:
    """Sum partial counts per hash; return the sorted hashes counted in more than ``more_than`` documents."""
    unique, inverse = np.unique(hashes, return_inverse=True)
    totals = np.bincount(inverse, weights=counts, minlength=unique.size)
    return unique[totals > more_than]


def remove_lines(text: str, boilerplate: np.ndarray, min_chars: int) -> tuple[str, int]:
    """``text`` without its boilerplate lines, and how many lines were removed."""
    if boilerplate.size == 0:
        return text, 0
    kept, removed = [], 0
    for line in text.split("\n"):
        key = line_key(line)
        if len(key) >= min_chars:
            h = np.uint64(line_hash(key))
            i = np.searchsorted(boilerplate, h)
            if i < boilerplate.size and boilerplate[i] == h:
                removed += 1
                continue
        kept.append(line)
    return ("\n".join(kept) if removed else text), removed


def remove_from_texts(texts: list[str], boilerplate: np.ndarray, min_chars: int) -> tuple[list[str], np.ndarray]:
    """:func:`remove_lines` over a batch: the cleaned texts and the lines removed from each."""
    cleaned = [remove_lines(t, boilerplate, min_chars) for t in texts]
    return [t for t, _ in cleaned], np.array([n for _, n in cleaned], dtype=np.int64)


def too_short(texts: list[str], lines_removed: np.ndarray, min_words: int) -> np.ndarray:
    """Per text: it lost boilerplate lines and has fewer than ``min_words`` words left."""
    return np.array([n > 0 and len(t.split()) < min_words for t, n in zip(texts, lines_removed)], dtype=bool)

"""MinHash signatures and LSH band keys, computed with numpy over whole batches of documents.

Design choices (why it looks like this):

* **Words from bytes, not a regex per document.** A batch is lower-cased, UTF-8 encoded and
  joined into one byte array. A word is a maximal run of ASCII letters/digits/underscore or
  non-ASCII bytes (so any non-ASCII letter is a word character), the same segmentation as the
  reference regex :data:`WORD_PATTERN`. Each word's 64-bit hash reads the word as 8-byte
  little-endian chunks (the last one zero-padded) and mixes ``len * G + sum_c K[c mod 64] *
  chunk_c`` with the splitmix64 finalizer (odd random ``K``: words of equal length differing in
  one chunk never collide). The chunks are gathered with one unaligned uint64 view of the byte
  array, one gather per chunk index over the words that long, so the work is per word, not per
  byte (a per-byte position-keyed sum measured ~4x slower) and there is no Python call per word.
* **Shingles** are word n-grams (``ngram``, default 5) hashed as ``mix(sum_j C[j] * w_{i+j})``
  over the flat word-hash array; windows crossing a document boundary are masked out. A
  document shorter than ``ngram`` words gets one shingle made of all its words (so short
  documents can still be duplicates); a document with no word gets no shingle and no band key.
* **Permutations** are ``(a * x + b) mod 2^32`` with odd ``a`` over ``x``, the top 32 bits of
  the (already mixed) shingle hash: each is a bijection of uniformly distributed values, so
  each permutation's minimum is equally likely to be any element of a set (the MinHash
  property; tests check the Jaccard estimate). uint32 arithmetic wraps in numpy and runs twice
  as many lanes per instruction as uint64 (measured 2x on the signature kernel). One
  (permutations x shingles) product per chunk and ``np.minimum.reduceat`` over document
  boundaries gives every signature at once; the product lives in a reused buffer of ~4k
  shingles, which measured ~7x faster than (shingles x permutations) with fresh temporaries
  (cache-resident, contiguous reductions).
* **Band keys** hash each band's ``rows`` signature values together with the band index, so equal
  keys mean "equal band b" and keys of different bands never meet in one bucket.

Everything is seeded: the same ``seed`` gives the same permutations on every worker and run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORD_PATTERN = r"[0-9a-z_\u0080-\U0010FFFF]+"  # the reference segmentation (on lower-cased text)
_CHUNK_KEYS = 64
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)  # by bytes kept
_CHUNK_SHINGLES = 4096
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_WORD_BYTE = np.zeros(256, dtype=bool)
for _ranges in (range(ord("0"), ord("9") + 1), range(ord("a"), ord("z") + 1),
                range(ord("A"), ord("Z") + 1), (ord("_"),), range(0x80, 0x100)):
    _WORD_BYTE[list(_ranges)] = True


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise over uint64 (a bijection with good avalanche)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _random_uint64(rng: np.random.Generator, size: int, odd: bool = False) -> np.ndarray:
    values = rng.integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False)
    return values | np.uint64(1) if odd else values


@dataclass(frozen=True)
class MinHasher:
    """Computes signatures and band keys; every array it holds derives from ``seed``."""

    ngram: int = 5
    num_perm: int = 112
    bands: int = 14
    rows: int = 8
    seed: int = 1

    def __post_init__(self) -> None:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        # Word hashing depends on the seed only, so hashers with other n-gram or permutation
        # settings (decontamination's 13-grams) can share one word-hashing pass.
        words = np.random.default_rng((self.seed, 0))
        rng = np.random.default_rng((self.seed, 1))
        object.__setattr__(self, "_chunk_keys", _random_uint64(words, _CHUNK_KEYS, odd=True))
        object.__setattr__(self, "_ngram_keys", _random_uint64(rng, self.ngram, odd=True))
        object.__setattr__(self, "_perm_a", (_random_uint64(rng, self.num_perm, odd=True) >> np.uint64(32))
                           .astype(np.uint32) | np.uint32(1))
        object.__setattr__(self, "_perm_b", (_random_uint64(rng, self.num_perm) >> np.uint64(32)).astype(np.uint32))
        object.__setattr__(self, "_row_keys", _random_uint64(rng, self.rows, odd=True))

    # -- words -----------------------------------------------------------------------------

    def word_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Hash every word of every text. Returns ``(hashes uint64[W], offsets int64[N+1])``:
        the words of text ``i`` are ``hashes[offsets[i]:offsets[i+1]]``, in order."""
        encoded = [t.lower().encode("utf-8", errors="replace") for t in texts]
        lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
        doc_starts = np.concatenate([[0], np.cumsum(lengths)])  # a separator byte after each doc
        data = np.frombuffer(b" ".join(encoded) + b" " * 8, dtype=np.uint8)  # 7 bytes of padding
        is_word = np.concatenate([[False], _WORD_BYTE[data]])  # a non-word byte before the first
        transitions = np.flatnonzero(np.diff(is_word.view(np.int8)))  # word starts and ends alternate
        word_starts, word_ends = transitions[0::2], transitions[1::2]
        if word_starts.size == 0:
            return np.zeros(0, np.uint64), np.zeros(len(texts) + 1, np.int64)
        word_lengths = word_ends - word_starts
        # chunks[i] = the 8 bytes data[i:i+8] as one little-endian uint64 (an unaligned view).
        chunks = np.ndarray((data.size - 7,), dtype="<u8", buffer=data, strides=(1,))
        with np.errstate(over="ignore"):
            first = chunks[word_starts] & _LOW_BYTES[np.minimum(word_lengths, 8)]
            acc = word_lengths.astype(np.uint64) * _GOLDEN + first * self._chunk_keys[0]
            words = np.flatnonzero(word_lengths > 8)  # the few longer words, one chunk at a time
            c = 1
            while words.size:
                remaining = np.minimum(word_lengths[words] - 8 * c, 8)
                value = chunks[word_starts[words] + 8 * c] & _LOW_BYTES[remaining]
                acc[words] += value * self._chunk_keys[c % _CHUNK_KEYS]
                c += 1
                words = words[word_lengths[words] > 8 * c]
            hashes = mix64(acc)
        # A separator byte ends every document, so no word spans two: the words of document i
        # are those starting in [doc_starts[i], doc_starts[i+1]).
        return hashes, np.searchsorted(word_starts, doc_starts).astype(np.int64)

    # -- shingles --------------------------------------------------------------------------

    def shingle_hashes(self, words: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Word n-gram hashes per document (see module docstring for short documents).

        Returns ``(shingles uint64[S], offsets int64[N+1])``, shingles of each document in order.
        """
        n = self.ngram
        counts = np.diff(offsets)
        doc_of_word = np.repeat(np.arange(counts.size), counts)
        num_windows = max(words.size - n + 1, 0)
        window_hash = np.zeros(num_windows, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                window_hash += words[j:j + num_windows] * self._ngram_keys[j]
        full = doc_of_word[:num_windows] == doc_of_word[n - 1:n - 1 + num_windows] if n > 1 \
            else np.ones(num_windows, dtype=bool)
        full_docs = doc_of_word[:num_windows][full]
        full_hashes = window_hash[full]

        short_docs = np.flatnonzero((counts > 0) & (counts < n))
        short_hashes = np.zeros(short_docs.size, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n - 1):
                has_word = counts[short_docs] > j
                short_hashes[has_word] += words[offsets[short_docs[has_word]] + j] * self._ngram_keys[j]

        docs = np.concatenate([full_docs, short_docs])
        order = np.argsort(docs, kind="stable")  # full windows are already in document order
        shingles = mix64(np.concatenate([full_hashes, short_hashes])[order])
        shingle_offsets = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(np.bincount(docs, minlength=counts.size), out=shingle_offsets[1:])
        return shingles, shingle_offsets

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.shingle_hashes(*self.word_hashes(texts))

    # -- signatures and bands --------------------------------------------------------------

    def signatures(self, shingles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """MinHash signatures ``uint32[N, num_perm]``; rows of documents without shingles are
        all ``0xFFFFFFFF`` (callers give such documents no band keys)."""
        num_docs = offsets.size - 1
        out = np.full((num_docs, self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        nonempty = np.flatnonzero(np.diff(offsets) > 0)
        values = (shingles >> np.uint64(32)).astype(np.uint32)
        buffer = np.empty((self.num_perm, _CHUNK_SHINGLES), dtype=np.uint32)
        start = 0
        while start < nonempty.size:
            # Take documents until the chunk holds about _CHUNK_SHINGLES shingles (at least one doc).
            first = offsets[nonempty[start]]
            stop = int(np.searchsorted(offsets[nonempty + 1], first + _CHUNK_SHINGLES, side="right"))
            stop = max(stop, start + 1)
            docs = nonempty[start:stop]
            chunk = values[first:offsets[docs[-1] + 1]]
            if chunk.size > buffer.shape[1]:
                buffer = np.empty((self.num_perm, chunk.size), dtype=np.uint32)
            permuted = buffer[:, :chunk.size]  # (num_perm, shingles): reductions run along rows
            with np.errstate(over="ignore"):
                np.multiply(self._perm_a[:, None], chunk[None, :], out=permuted)
                permuted += self._perm_b[:, None]
            out[docs] = np.minimum.reduceat(permuted, offsets[docs] - first, axis=1).T
            start = stop
        return out

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """``uint64[N, bands]``: a hash of each band's ``rows`` values, salted by band index."""
        used = signatures[:, :self.bands * self.rows].astype(np.uint64)
        banded = used.reshape(used.shape[0], self.bands, self.rows)
        with np.errstate(over="ignore"):
            combined = (banded * self._row_keys[None, None, :]).sum(axis=2, dtype=np.uint64)
            salted = combined + np.arange(self.bands, dtype=np.uint64)[None, :] * _GOLDEN
        return mix64(salted)

    def shingle_band_keys(self, shingles: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Band keys of documents given as shingles, and a mask of documents that have any."""
        return self.band_keys(self.signatures(shingles, offsets)), np.diff(offsets) > 0

    def document_band_keys(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Band keys for a batch of texts and a mask of documents that have any shingle."""
        return self.shingle_band_keys(*self.shingles(texts))


SHINGLE_BITS = 40  # bits of a shingle hash that exact-Jaccard verification compares
_SHINGLE_MASK = np.uint64((1 << SHINGLE_BITS) - 1)


def sorted_distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values. A stable sort is timsort here: linear on already-sorted runs, so
    rows prepared by :func:`distinct_rows` cost a merge, not a sort (numpy 2.4's hash-based
    ``np.unique`` measured ~18x slower than sorting on 3M random uint64)."""
    values = np.sort(values, kind="stable")
    keep = np.ones(values.size, dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _row_value_keys(offsets: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Distinct ``(row, value)`` pairs of a ragged array as sorted uint64 keys: the row in the
    high bits, the value's low ``SHINGLE_BITS`` bits below it."""
    rows = np.arange(offsets.size - 1, dtype=np.uint64)
    if rows.size > 1 << (64 - SHINGLE_BITS):
        raise ValueError(f"{rows.size} rows: at most 2^{64 - SHINGLE_BITS} per call")
    rows = np.repeat(rows, np.diff(offsets))
    low = values.astype(np.uint64, copy=False) & _SHINGLE_MASK
    return sorted_distinct((rows << np.uint64(SHINGLE_BITS)) | low)


def _rows_of(keys: np.ndarray) -> np.ndarray:
    return (keys >> np.uint64(SHINGLE_BITS)).astype(np.int64)


def distinct_rows(offsets: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's values cut to their low ``SHINGLE_BITS`` bits, sorted and distinct: the form
    in which :func:`row_jaccard` needs no sort of its own."""
    keys = _row_value_keys(offsets, values)
    counts = np.bincount(_rows_of(keys), minlength=offsets.size - 1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), keys & _SHINGLE_MASK


def row_jaccard(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Jaccard similarity of row i of ``a`` with row i of ``b``, for every row at once.

    ``a`` and ``b`` are ragged arrays ``(offsets int64[N+1], values uint64)`` with the same N
    (shingle hashes; repeats inside a row count once). Two empty rows have similarity 0. The row
    number goes into the high bits of each value, so the batch is a merge of two flat sorted
    uint64 arrays (no Python loop over pairs). Values are compared on their low ``SHINGLE_BITS``
    bits: for hashes, two distinct shingles agree there with probability 2^-40, so a pair of
    400-shingle documents gains a false shared shingle (0.1% of Jaccard) about once in 7 million."""
    n = a[0].size - 1
    keys_a, keys_b = _row_value_keys(*a), _row_value_keys(*b)
    both = np.sort(np.concatenate([keys_a, keys_b]), kind="stable")
    shared = both[1:][both[1:] == both[:-1]]
    intersection = np.bincount(_rows_of(shared), minlength=n)
    union = np.bincount(_rows_of(keys_a), minlength=n) + np.bincount(_rows_of(keys_b), minlength=n) - intersection
    return np.divide(intersection, union, out=np.zeros(n), where=union > 0)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash sets (arrays may hold repeats)."""
    return float(row_jaccard((np.array([0, a.size]), a), (np.array([0, b.size]), b))[0])

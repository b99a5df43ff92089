"""Evaluation decontamination: find training documents that share a word n-gram (default 13,
as in GPT-3) with any item of the configured evaluation tasks.

Task files are JSONL or JSONL.gz in any layout: every string value inside a record (question
stems, choices, passages, solutions, tests) is a text of that task, so a user-added task file
needs no loader. Each text of at least ``ngram`` words contributes its word n-grams, hashed
exactly as MinHash shingles are (``minhash.MinHasher`` with ``ngram`` words, the same word
segmentation), so a document is matched with one ``searchsorted`` over a sorted uint64 index.
Each index entry carries a bitmask of the tasks it came from (at most 64 tasks), so one lookup
names every task a document overlaps.

A text shorter than ``ngram`` words but of at least ``min_words`` (a short question stem: about
a third of ARC's) is indexed whole, as GPT-3 did, and documents are then also scanned with
windows of that length; shorter texts (a yes/no answer, a one-word choice) are skipped. The
report counts the texts indexed per task. A k-word window hash uses the first k n-gram keys of
the seeded MinHasher, so a whole short text and a k-word window of a document hash alike.
The index is built once on the driver from the small evaluation files (a few MB) and shipped
to workers through the object store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llmray import jsonl
from llmray.data.dedup.minhash import MinHasher

MAX_TASKS = 64


def record_strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value, in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from record_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from record_strings(item)


def read_task_texts(path: Path) -> list[str]:
    """All strings of a JSONL(.gz) task file (a line may be any JSON value); a line that is not
    valid JSON or UTF-8 is an error naming file and line."""
    texts: list[str] = []
    for line in jsonl.read_lines(path, require_object=False):
        if isinstance(line.record, jsonl.BadLine):
            raise ValueError(f"{line.record}; decontamination task files must be JSONL")
        texts.extend(record_strings(line.record))
    return texts


@dataclass
class EvalIndex:
    """Sorted n-gram hashes of the evaluation texts and, per hash, a bitmask of tasks."""

    tasks: list[str]
    ngrams: np.ndarray  # uint64[K], sorted, unique
    masks: np.ndarray  # uint64[K]
    lengths: list[int]  # window lengths (in words) that documents are scanned with
    texts_indexed: dict[str, int]
    seed: int

    @classmethod
    def build(cls, task_files: dict[str, list[Path]], ngram: int, min_words: int, seed: int) -> "EvalIndex":
        if len(task_files) > MAX_TASKS:
            raise ValueError(f"at most {MAX_TASKS} decontamination tasks, got {len(task_files)}")
        hasher = _hasher(ngram, seed)
        all_hashes, all_masks, indexed, lengths = [], [], {}, {ngram}
        for bit, (task, paths) in enumerate(task_files.items()):
            texts = [t for path in paths for t in read_task_texts(path)]
            words, word_offsets = hasher.word_hashes(texts)
            counts = np.diff(word_offsets)
            usable = counts >= min(min_words, ngram)
            lengths.update(int(c) for c in np.unique(counts[usable & (counts < ngram)]))
            shingles, offsets = hasher.shingle_hashes(words, word_offsets)
            keep = np.repeat(usable, np.diff(offsets))
            indexed[task] = int(usable.sum())
            all_hashes.append(shingles[keep])
            all_masks.append(np.full(int(keep.sum()), np.uint64(1) << np.uint64(bit), dtype=np.uint64))
        hashes = np.concatenate(all_hashes) if all_hashes else np.zeros(0, np.uint64)
        masks = np.concatenate(all_masks) if all_masks else np.zeros(0, np.uint64)
        unique, inverse = np.unique(hashes, return_inverse=True)
        merged = np.zeros(unique.size, dtype=np.uint64)
        np.bitwise_or.at(merged, inverse, masks)
        return cls(list(task_files), unique, merged, sorted(lengths), indexed, seed)

    def match(self, words: np.ndarray, word_offsets: np.ndarray) -> np.ndarray:
        """Per document (given its word hashes from a ``MinHasher`` with this index's seed), the
        OR of the task bits of every evaluation n-gram it contains (0 = clean)."""
        num_docs = word_offsets.size - 1
        result = np.zeros(num_docs, dtype=np.uint64)
        if self.ngrams.size == 0 or words.size == 0:
            return result
        for length in self.lengths:
            shingles, offsets = _hasher(length, self.seed).shingle_hashes(words, word_offsets)
            position = np.minimum(np.searchsorted(self.ngrams, shingles), self.ngrams.size - 1)
            hit = self.ngrams[position] == shingles
            doc_of_shingle = np.repeat(np.arange(num_docs), np.diff(offsets))
            np.bitwise_or.at(result, doc_of_shingle[hit], self.masks[position[hit]])
        return result


def _hasher(ngram: int, seed: int) -> MinHasher:
    return MinHasher(ngram=ngram, num_perm=1, bands=1, rows=1, seed=seed)

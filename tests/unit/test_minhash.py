"""MinHash: segmentation and shingles against a pure-Python reference, signatures against exact Jaccard."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from llmray.data.dedup.minhash import WORD_PATTERN, MinHasher, jaccard, row_jaccard


def reference_shingles(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(WORD_PATTERN, text.lower())
    if 0 < len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def reference_jaccard(a: str, b: str, n: int) -> float:
    sa, sb = reference_shingles(a, n), reference_shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


@pytest.fixture(scope="module")
def c4_texts(shared_data) -> list[str]:
    with open(shared_data / "c4_sample" / "c4_demo.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:120]


def edit_words(text: str, fraction: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), int(len(words) * fraction)):
        words[i] = f"edited{rng.randrange(10**6)}"
    return " ".join(words)


def test_word_segmentation_matches_reference_regex(c4_texts):
    texts = c4_texts + ["", "   ", "héllo wörld — ok", "__init__ Foo_bar 12ab", "日本語 テキスト"]
    hashes, offsets = MinHasher().word_hashes(texts)
    words = [re.findall(WORD_PATTERN, t.lower()) for t in texts]
    assert np.diff(offsets).tolist() == [len(w) for w in words]
    seen: dict[str, int] = {}
    for word, h in zip((w for ws in words for w in ws), hashes.tolist()):
        assert seen.setdefault(word, h) == h, f"word {word!r} hashed two ways"
    assert len(set(seen.values())) == len(seen), "two distinct words share a hash"


def test_shingle_sets_match_reference(c4_texts):
    hasher = MinHasher(ngram=5)
    texts = c4_texts[:40] + ["one two", "a b c d e", ""]
    shingles, offsets = hasher.shingles(texts)
    for i, text in enumerate(texts):
        assert np.unique(shingles[offsets[i]:offsets[i + 1]]).size == len(reference_shingles(text, 5))
    for i in range(0, 38, 2):
        a, b = shingles[offsets[i]:offsets[i + 1]], shingles[offsets[i + 1]:offsets[i + 2]]
        assert jaccard(a, b) == pytest.approx(reference_jaccard(texts[i], texts[i + 1], 5))


def test_row_jaccard_matches_python_sets():
    """Rows with repeats, empty rows and overlaps of every size, against Python sets."""
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(2):
        sizes = rng.integers(0, 40, size=300)
        sizes[:3] = 0
        sides.append((np.concatenate([[0], np.cumsum(sizes)]), rng.integers(0, 60, size=sizes.sum()).astype(np.uint64)))
    result = row_jaccard(*sides)
    for i in range(300):
        a, b = (set(values[offsets[i]:offsets[i + 1]].tolist()) for offsets, values in sides)
        assert result[i] == pytest.approx(len(a & b) / len(a | b) if a | b else 0.0), i
    assert np.unique(np.round(result, 2)).size > 30  # overlaps of many sizes were exercised


def test_signatures_do_not_depend_on_batch_composition(c4_texts):
    hasher = MinHasher()
    whole = hasher.signatures(*hasher.shingles(c4_texts))
    pieces = np.concatenate([hasher.signatures(*hasher.shingles(c4_texts[i:i + 7]))
                             for i in range(0, len(c4_texts), 7)])
    assert np.array_equal(whole, pieces)
    assert np.array_equal(whole, MinHasher(seed=1).signatures(*MinHasher(seed=1).shingles(c4_texts)))
    assert not np.array_equal(whole, MinHasher(seed=2).signatures(*MinHasher(seed=2).shingles(c4_texts)))


def test_signature_agreement_estimates_jaccard(c4_texts):
    rng = random.Random(0)
    hasher = MinHasher(num_perm=256, bands=32, rows=8)
    originals = [t for t in c4_texts if len(t.split()) > 150][:30]
    copies = [edit_words(t, rng.choice([0.01, 0.03, 0.1]), rng) for t in originals]
    sigs = hasher.signatures(*hasher.shingles(originals + copies))
    errors = []
    for i in range(len(originals)):
        estimate = float(np.mean(sigs[i] == sigs[len(originals) + i]))
        errors.append(abs(estimate - reference_jaccard(originals[i], copies[i], 5)))
    # Standard error of a 256-permutation estimate is at most 1/(2*sqrt(256)) = 0.031.
    assert np.mean(errors) < 0.04 and max(errors) < 0.15


def test_band_keys_collide_for_near_copies_only(c4_texts):
    rng = random.Random(1)
    hasher = MinHasher()
    originals = [t for t in c4_texts if len(t.split()) > 200][:20]
    near = [edit_words(t, 0.01, rng) for t in originals]  # Jaccard ~0.95
    keys, has_shingles = hasher.document_band_keys(originals + near)
    assert has_shingles.all()
    n = len(originals)
    for i in range(n):
        assert np.intersect1d(keys[i], keys[n + i]).size > 0, "near copy shares no band"
        for j in range(i + 1, n):
            assert np.intersect1d(keys[i], keys[j]).size == 0, "distinct documents share a band"
    assert len(set(keys[0].tolist())) == hasher.bands  # band index salts the key


def test_documents_without_words_get_no_shingles():
    hasher = MinHasher()
    keys, has_shingles = hasher.document_band_keys(["", "!!! ???", "short text"])
    assert has_shingles.tolist() == [False, False, True]


def test_rejects_more_bands_than_permutations():
    with pytest.raises(ValueError, match="exceeds num_perm"):
        MinHasher(num_perm=16, bands=5, rows=4)

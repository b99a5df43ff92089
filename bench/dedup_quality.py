"""Near-dedup quality: precision, recall and F1 of llmray's MinHash LSH stage and of datasketch's
MinHashLSH against exact Jaccard ground truth, on a labelled set built from real text.

The labelled set (``--docs``, default 20,000; ``--quick`` 6,000):
* 70% distinct real documents (``_dedup_corpus.base_documents``: ../shared/data when present plus
  this machine's /usr/share/doc and pydoc topics), cut to 20-400 words. Real text carries its own
  near-duplicates (licences, repeated boilerplate pages); the ground truth finds those too.
* 30% near copies, each made from a real document (or, one time in five, from an earlier copy,
  which plants chains A~B~C where A and C may be less similar) at a target Jaccard drawn
  uniformly from [0.5, 1.0]: words are substituted with real words, deleted and inserted at the
  rate that leaves that fraction of word 5-grams intact, and one copy in three gets a
  boilerplate line (cookie banner, navigation, footer) added or swapped.

Ground truth: exact Jaccard of word 5-gram shingle sets (the shingles both tools use; a shingle
is identified by xxh3-64 of its text) for *every* pair at or above ``--threshold`` (0.8), found
with prefix filtering (all pairs with J >= t share a token in their frequency-ordered prefixes,
so this is exact, not sampled) and then verified by set intersection. True clusters are the
connected components of those pairs: what a deduplicator that keeps one document per cluster
should find.

Scores are pairwise over clusters: a predicted pair is two documents put in the same cluster;
precision = predicted pairs that are true pairs / predicted pairs, recall = true pairs predicted /
true pairs. Both tools use word 5-grams of the same tokenisation, 112 permutations, 14 bands x 8
rows. llmray runs twice: with its defaults (candidate edges verified by exact Jaccard >=
threshold) and with ``minhash.verify: false`` (band matches alone, like datasketch).

Last line: JSON with precision, recall, f1 (llmray defaults), unverified_f1, datasketch_f1 and the rest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import xxhash

from _dedup_corpus import base_documents, run_datasketch, run_llmray, shingle_strings, write_parquet
from _load import LoadWatch

BOILERPLATE = [
    "This website uses cookies to ensure you get the best experience on our website. Accept all cookies",
    "Home | About us | Contact | Privacy policy | Terms of service | Sitemap",
    "Copyright 2024 All rights reserved. Reproduction without permission is prohibited.",
    "Subscribe to our newsletter to receive the latest news and exclusive offers straight to your inbox.",
    "Share this article on Facebook Twitter LinkedIn Email Print",
]


# -- the labelled set ---------------------------------------------------------------------------

def edit_rate(target_jaccard: float, ngram: int = 5) -> float:
    """Fraction of word positions to edit so that about ``target_jaccard`` of the 5-gram set
    survives: a kept fraction q of shingles gives J = q / (2 - q), and a shingle survives when
    none of its n words was edited, q = (1 - p)^n."""
    kept = 2 * target_jaccard / (1 + target_jaccard)
    return 1 - kept ** (1 / ngram)


def near_copy(text: str, target_jaccard: float, vocabulary: list[str], rng: random.Random) -> str:
    rate = edit_rate(target_jaccard)
    out = []
    for word in text.split():
        r = rng.random()
        if r < rate / 3:  # deletion
            continue
        if r < 2 * rate / 3:  # substitution
            out.append(rng.choice(vocabulary))
        elif r < rate:  # insertion
            out += [word, rng.choice(vocabulary)]
        else:
            out.append(word)
    copy = " ".join(out)
    if rng.random() < 1 / 3:  # boilerplate added at either end, or swapped for another
        present = [b for b in BOILERPLATE if b in copy]
        if present:
            copy = copy.replace(present[0], rng.choice(BOILERPLATE))
        else:
            line = rng.choice(BOILERPLATE)
            copy = f"{line}\n{copy}" if rng.random() < 0.5 else f"{copy}\n{line}"
    return copy


def labelled_set(base: list[str], n: int, seed: int) -> tuple[list[str], list[float]]:
    """Real documents plus near copies; returns the texts and the target Jaccard of each copy."""
    rng = random.Random(seed)
    distinct = sorted(set(base))
    rng.shuffle(distinct)
    num_real = int(n * 0.7)
    if len(distinct) < num_real:
        raise SystemExit(f"only {len(distinct)} distinct base documents for {num_real} real ones; lower --docs")
    texts = distinct[:num_real]
    vocabulary = [w for t in texts[:2000] for w in t.split()]
    targets = []
    while len(texts) < n:
        source = rng.choice(texts[num_real:]) if len(texts) > num_real and rng.random() < 0.2 \
            else rng.choice(texts[:int(num_real * 0.4)])
        target = rng.uniform(0.5, 1.0)
        texts.append(near_copy(source, target, vocabulary, rng))
        targets.append(target)
    return texts, targets


# -- exact ground truth -------------------------------------------------------------------------

def shingle_sets(texts: list[str]) -> list[np.ndarray]:
    return [np.unique(np.fromiter((xxhash.xxh3_64_intdigest(s.encode()) for s in shingle_strings(t)),
                                  dtype=np.uint64)) for t in texts]


def similar_pairs(sets: list[np.ndarray], threshold: float) -> dict[tuple[int, int], float]:
    """Every pair (i < j) with exact Jaccard >= threshold, by prefix filtering: order each set's
    tokens rarest first; a pair with J >= t overlaps in at least ceil(t * |x|) tokens, so it shares
    a token among the first |x| - ceil(t * |x|) + 1 of each set."""
    sizes = np.array([s.size for s in sets])
    doc = np.repeat(np.arange(len(sets)), sizes)
    tokens = np.concatenate(sets)
    _, inverse, counts = np.unique(tokens, return_inverse=True, return_counts=True)
    order = np.lexsort((inverse, counts[inverse], doc))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(tokens.size) - starts[doc[order]]
    prefix = sizes - np.ceil(threshold * sizes - 1e-9).astype(np.int64) + 1
    chosen = order[rank < prefix[doc[order]]]
    token_of, doc_of = inverse[chosen], doc[chosen]
    by_token = np.lexsort((doc_of, token_of))
    token_of, doc_of = token_of[by_token], doc_of[by_token]
    bounds = np.flatnonzero(np.diff(np.concatenate([[-1], token_of, [-1]])))
    candidates = set()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a > 1:
            candidates.update(itertools.combinations(doc_of[a:b].tolist(), 2))
    pairs = {}
    for i, j in candidates:
        inter = np.intersect1d(sets[i], sets[j], assume_unique=True).size
        similarity = inter / (sizes[i] + sizes[j] - inter)
        if similarity >= threshold:
            pairs[(i, j)] = similarity
    return pairs


def clusters_from_pairs(n: int, pairs) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        parent[find(i)] = find(j)
    return [find(i) for i in range(n)]


def co_clustered(roots: list[int]) -> set[tuple[int, int]]:
    members: dict[int, list[int]] = {}
    for i, root in enumerate(roots):
        members.setdefault(root, []).append(i)
    return {pair for group in members.values() if len(group) > 1 for pair in itertools.combinations(group, 2)}


def scores(predicted: set, truth: set) -> dict:
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 1.0
    recall = hits / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "predicted_pairs": len(predicted)}


def llmray_roots(ids: list[str], rejected) -> list[int]:
    index = {doc_id: i for i, doc_id in enumerate(ids)}
    roots = list(range(len(ids)))
    for doc_id, kept in zip(rejected["id"].to_pylist(), rejected["value"].to_pylist()):
        roots[index[doc_id]] = index[kept]
    return roots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6,000 documents")
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--threshold", type=float, default=0.8, help="Jaccard of a true near-duplicate pair")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    load = LoadWatch(2)
    n = 6_000 if args.quick else args.docs

    texts, targets = labelled_set(base_documents(), n, args.seed)
    sets = shingle_sets(texts)
    pairs = similar_pairs(sets, args.threshold)
    truth = co_clustered(clusters_from_pairs(n, pairs))
    similarity_histogram = Counter(math.floor(s * 10) / 10 for s in pairs.values())
    print(f"{n} documents ({len(targets)} planted copies); {len(pairs)} pairs with Jaccard >= "
          f"{args.threshold}; {len(truth)} co-clustered true pairs", flush=True)

    import ray

    work = Path(tempfile.mkdtemp(prefix="dedup_quality_"))
    ids = write_parquet(texts, work / "docs")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    results = {}
    for name, minhash in (("llmray", {"threshold": args.threshold}), ("llmray_unverified", {"verify": False})):
        seconds, info, rejected = run_llmray(work / "docs", minhash)
        results[name] = {**scores(co_clustered(llmray_roots(ids, rejected)), truth), "seconds": round(seconds, 1)}
        print(f"{name}: {results[name]}", flush=True)
    ray.shutdown()
    seconds, roots = run_datasketch(work / "docs")
    results["datasketch"] = {**scores(co_clustered(roots), truth), "seconds": round(seconds, 1)}
    print(f"datasketch: {results['datasketch']}", flush=True)

    print(json.dumps({
        "documents": n, "planted_copies": len(targets), "threshold": args.threshold,
        "true_similar_pairs": len(pairs), "true_co_clustered_pairs": len(truth),
        "true_pair_jaccard_histogram": {f"{k:.1f}": v for k, v in sorted(similarity_histogram.items())},
        **{k: v for k, v in results["llmray"].items()},
        "unverified_precision": results["llmray_unverified"]["precision"],
        "unverified_recall": results["llmray_unverified"]["recall"],
        "unverified_f1": results["llmray_unverified"]["f1"],
        "datasketch_precision": results["datasketch"]["precision"],
        "datasketch_recall": results["datasketch"]["recall"],
        "datasketch_f1": results["datasketch"]["f1"], **load.fields(),
    }))


if __name__ == "__main__":
    main()

"""What the two dedup benchmarks share: the real-text corpus, its parquet layout, and both peers.

* :func:`base_documents`: real text (c4, Common Crawl text, Wikipedia paragraphs, Gutenberg from
  ../shared/data when present, /usr/share/doc + pydoc topics from this machine) cut into
  documents of 20-400 words.
* :func:`run_llmray`: llmray's ``deduplicate`` with only MinHash on (exact dedup, boilerplate and
  decontamination off) over a parquet directory, on the Ray already initialised.
* :func:`run_datasketch`: the same parquet read with pyarrow, ``datasketch`` MinHash over the same shingles (word 5-grams of the same
  tokenisation, 112 permutations) in a 2-process pool, then ``MinHashLSH(params=(14, 8))`` insert
  and query, clusters by union-find. It returns every document's cluster root.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import re
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
WORD = re.compile(r"[0-9a-z_\u0080-\U0010FFFF]+")  # llmray.data.dedup.minhash.WORD_PATTERN
NGRAM, NUM_PERM, BANDS, ROWS = 5, 112, 14, 8


def _shared_texts() -> list[str]:
    if not SHARED.is_dir():
        return []
    texts = [json.loads(line)["text"] for line in (SHARED / "c4_sample" / "c4_demo.jsonl").open()]
    for path in sorted((SHARED / "web_cc_text").glob("*.jsonl.gz")):
        texts += [json.loads(line).get("text", "") for line in gzip.open(path, "rt", encoding="utf-8")]
    texts += [p for line in (SHARED / "wikipedia_sample" / "wiki_demo.txt").open() for p in line.split("  ") if p]
    for path in sorted((SHARED / "books_gutenberg").glob("*.txt.gz")):
        texts.append(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))
    return texts


def base_documents(max_words: int = 400, min_words: int = 20) -> list[str]:
    from llmray.data.readers.machine_text import discover, read_documents

    texts = _shared_texts()
    for file in discover(["doc", "pydoc_topics"], max_files_per_kind=1500):
        try:
            texts += [text for _, text, _ in read_documents(file, 10 << 20)]
        except ValueError:
            continue
    docs = []
    for text in texts:
        words = text.split()
        docs += [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)
                 if len(words[i:i + max_words]) >= min_words]
    return docs


def shingle_strings(text: str) -> set[str]:
    """Word 5-grams as strings (a document shorter than 5 words is one shingle of all its words),
    the definition llmray's MinHasher uses."""
    words = WORD.findall(text.lower())
    return {" ".join(words[i:i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 1))} if words else set()


def write_parquet(texts: list[str], directory: Path, shards: int = 8) -> list[str]:
    """Write ``texts`` as parquet shards; returns every text's document id, in input order."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = [f"doc-{i % shards:02d}-{i // shards:08d}" for i in range(len(texts))]
    for s in range(shards):
        part = texts[s::shards]
        pq.write_table(pa.table({"id": ids[s::shards], "text": part, "source": ["bench"] * len(part),
                                 "quality_score": [0.5] * len(part), "meta": ["{}"] * len(part)}),
                       directory / f"part-{s:02d}.parquet")
    return ids


def run_llmray(directory: Path, minhash: dict | None = None, **dedup: Any) -> tuple[float, dict, Any]:
    """Near-dedup ``directory`` as the curate stage does it (its input read by one task per file,
    as curate's readers do, and materialised; dedup then reads it twice: keys, then the filter);
    ``dedup`` overrides other ``DedupConfig`` fields. Returns (seconds, summary, rejected rows as
    an Arrow table)."""
    import ray

    from llmray.config import from_dict
    from llmray.data.dedup import REJECTED_SCHEMA, DedupConfig, deduplicate

    cfg = from_dict(DedupConfig, {"exact": False, "decontam": {"enabled": False}, "minhash": minhash or {}, **dedup})
    start = time.perf_counter()
    files = [{"path": str(p)} for p in sorted(directory.glob("*.parquet"))]
    documents = ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        lambda batch: pq.read_table(batch["path"][0].as_py()), batch_size=1, batch_format="pyarrow").materialize()
    result = deduplicate(documents, cfg)
    kept = result.documents.count()
    rejected = pa.concat_tables([REJECTED_SCHEMA.empty_table(), *ray.get(result.rejected.to_arrow_refs())])
    elapsed = time.perf_counter() - start
    return elapsed, {"kept": kept, "rejected": rejected.num_rows, "clusters": result.stats["near_dedup"]["clusters"],
                     "plan": result.stats["plan"], "partitions": result.stats["partitions"]}, rejected


def _datasketch_signatures(texts: list[str]):
    from datasketch import MinHash

    out = []
    for text in texts:
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode() for s in shingle_strings(text)])
        out.append(m)
    return out


def read_texts(directory: Path) -> list[str]:
    """The texts of :func:`write_parquet`'s shards, in the order they were given to it."""
    shards = [pq.read_table(p, columns=["text"])["text"].to_pylist() for p in sorted(directory.glob("*.parquet"))]
    return [shards[i % len(shards)][i // len(shards)] for i in range(sum(map(len, shards)))]


def run_datasketch(directory: Path) -> tuple[float, list[int]]:
    """Read ``directory`` and cluster it; returns (seconds, cluster root index of every text)."""
    from datasketch import MinHashLSH

    start = time.perf_counter()
    texts = read_texts(directory)
    chunks = [texts[i:i + 500] for i in range(0, len(texts), 500)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        signatures = [m for part in pool.map(_datasketch_signatures, chunks) for m in part]
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(BANDS, ROWS))
    parent = list(range(len(texts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(signatures):
        for j in lsh.query(m):
            parent[find(i)] = find(j)
        lsh.insert(i, m)
    roots = [find(i) for i in range(len(texts))]
    return time.perf_counter() - start, roots

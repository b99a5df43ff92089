"""A small real corpus for tokenizer and token-shard tests: slices of shared/data as JSONL/parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_corpus(shared_data: Path, directory: Path, c4_docs: int = 150, wiki_docs: int = 10,
                 shakespeare_docs: int = 1000) -> Path:
    """Three sources: c4 (JSONL, no ids), wikipedia (parquet with id/source), shakespeare (JSONL.gz-free)."""
    directory.mkdir(parents=True, exist_ok=True)
    c4_lines = (shared_data / "c4_sample" / "c4_demo.jsonl").read_text().splitlines()[:c4_docs]
    (directory / "c4.jsonl").write_text("\n".join(c4_lines) + "\n")
    articles = (shared_data / "wikipedia_sample" / "wiki_demo.txt").read_text().splitlines()[:wiki_docs]
    pq.write_table(pa.table({"id": [f"wiki-{i}" for i in range(len(articles))], "text": articles,
                             "source": ["wikipedia"] * len(articles)}), directory / "wiki.parquet")
    plays = (shared_data / "books_tinyshakespeare" / "input.txt").read_text().split("\n\n")[:shakespeare_docs]
    (directory / "shakespeare.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in plays))
    return directory

"""Tokenization throughput: `llmray tokens` (Ray Data actor pool) vs a single-process `tokenizers` loop.

    python bench/tokenize_speed.py            # >= 60 MB of real text, 3 alternating repeats
    python bench/tokenize_speed.py --quick    # ~12 MB, 3 alternating repeats (under 5 minutes)

Input: real text only, written once to parquet (id, text, source): the shared data sets
(C4, Wikipedia, Tiny Shakespeare, Gutenberg books, Common Crawl text) followed by this machine's
Python standard library sources and man pages until the target size is reached.

Peers, on the same parquet files, the same 32k tokenizer (trained here on that input; its
training time is reported) and the same number of threads:

* **llmray**: the `tokens` stage through the stage runner with its default ``plan: auto``, which
  tokenizes inputs up to ``local_max_mb`` (256 MB) in the stage's process (same reader,
  encoder and ordered shard writer with sha256, all cores to the tokenizer);
* **llmray actors**: the same stage with ``plan: actors`` (Ray Data read tasks, streaming
  repartition, ``actors`` encoder actors with ``threads_per_actor`` Rayon threads each). Ray is
  started before timing; actor start-up is inside the timing.
* **tokenizers**: one process reading the parquet batches with pyarrow, ``encode_batch`` (and,
  separately, ``encode_batch_fast``, which skips offsets) with ``RAYON_NUM_THREADS`` threads,
  converting to uint16 and writing one file.

Runs alternate (llmray, llmray actors, tokenizers, tokenizers-fast, ...) and medians are reported. The last
line is JSON with ``tokens_per_s``, ``tokenizers_tokens_per_s``, ``ratio_vs_tokenizers`` (vs
``encode_batch``), ``ratio_vs_tokenizers_fast`` and ``bpe_train_seconds_32k``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _load import LoadWatch

THREADS = 2
os.environ.setdefault("RAYON_NUM_THREADS", str(THREADS))  # before tokenizers starts its thread pool

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmray import cluster, stages  # noqa: E402
from llmray.data.readers import machine_text  # noqa: E402
from llmray.tokenizer import load_tokenizer  # noqa: E402
from llmray.tokenizer import train as tokenizer_train  # noqa: E402
from llmray.tokens.tokenize import TokensConfig  # noqa: E402

SHARED = Path(os.environ.get("LLMRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
FILE_BYTES = 8 << 20


def shared_documents():
    """(source, text) of the shared text sets, in a fixed order."""
    for line in (SHARED / "c4_sample" / "c4_demo.jsonl").read_text().split("\n"):
        if not line.strip():
            continue
        yield "c4", json.loads(line)["text"]
    for line in (SHARED / "wikipedia_sample" / "wiki_demo.txt").read_text().split("\n"):
        if line.strip():
            yield "wikipedia", line
    for scene in (SHARED / "books_tinyshakespeare" / "input.txt").read_text().split("\n\n"):
        yield "shakespeare", scene
    for book in sorted((SHARED / "books_gutenberg").glob("*.txt.gz")):
        yield "gutenberg", gzip.decompress(book.read_bytes()).decode("utf-8", errors="replace")
    for dump in sorted((SHARED / "web_cc_text").glob("*.jsonl.gz")):
        for line in gzip.decompress(dump.read_bytes()).decode().split("\n"):
            if not line.strip():
                continue
            yield "web", json.loads(line)["text"]


def machine_documents():
    for file in machine_text.discover(["python_stdlib", "man"]):
        try:
            for _, text, _ in machine_text.read_documents(file, 10 << 20):
                yield file.kind, text
        except (ValueError, OSError):
            continue


def build_input(directory: Path, target_bytes: int) -> dict:
    """Write >= target_bytes of real text as parquet files; return size and document counts."""
    marker = directory / "input.json"
    if marker.exists() and json.loads(marker.read_text())["target_bytes"] == target_bytes:
        return json.loads(marker.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.parquet"):
        old.unlink()
    rows, size, total, files, docs = [], 0, 0, 0, 0

    def flush():
        nonlocal rows, size, files
        pq.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[2] for r in rows],
                                 "source": [r[1] for r in rows]}), directory / f"part-{files:04d}.parquet")
        rows, size, files = [], 0, files + 1

    for source, text in (*shared_documents(), *machine_documents()):
        if not text.strip():
            continue
        rows.append((f"{source}-{docs:07d}", source, text))
        nbytes = len(text.encode("utf-8"))
        size, total, docs = size + nbytes, total + nbytes, docs + 1
        if size >= FILE_BYTES:
            flush()
        if total >= target_bytes:
            break
    if rows:
        flush()
    info = {"target_bytes": target_bytes, "bytes": total, "documents": docs, "files": files}
    marker.write_text(json.dumps(info))
    return info


def run_stage(name: str, cfg, run_root: Path) -> dict:
    return stages.run_stage(stages.STAGES[name], cfg, run_root, force=True).manifest["summary"]


def tokenizers_loop(files: list[Path], tokenizer_dir: Path, out: Path, fast: bool) -> tuple[int, float]:
    """The single-process peer: read parquet, encode in batches, write uint16 tokens; (tokens, seconds)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.encode_special_tokens = True
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    started = time.perf_counter()
    tokens = 0
    with open(out, "wb") as handle:
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=256, columns=["text"]):
                encodings = encode(batch.column("text").to_pylist())
                for encoding in encodings:
                    handle.write(np.asarray(encoding.ids, dtype=np.uint16).tobytes())
                    tokens += len(encoding.ids)
    return tokens, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~12 MB, 3 repeats")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmray-bench/tokenize_speed"))
    parser.add_argument("--mb", type=float, default=None, help="input size in MB (default 60, quick 12)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    target_mb = args.mb or (12 if args.quick else 60)
    repeats = args.repeats or 3
    load = LoadWatch(THREADS + 1)  # the local plan reads ahead on a thread beside the tokenizer's THREADS

    docs_dir = args.workdir / f"docs-{target_mb:g}mb"
    info = build_input(docs_dir, int(target_mb * 1e6))
    files = sorted(docs_dir.glob("*.parquet"))
    print(f"input: {info['bytes'] / 1e6:.1f} MB, {info['documents']:,} documents, {len(files)} parquet files")

    runs_root = args.workdir / "runs"
    tokenizer_cfg = tokenizer_train.TokenizerConfig(documents=str(docs_dir), vocab_size=32768,
                                                    char_budget=10**10, max_doc_chars=10**8, val_fraction=0.0)
    trained = run_stage("tokenizer", tokenizer_cfg, runs_root / "bench")
    tokenizer_dir = runs_root / "bench" / "tokenizer" / "output"
    print(f"BPE training, 32k vocab on {trained['train_chars'] / 1e6:.1f} M chars: {trained['train_seconds']:.1f} s")

    cluster.connect(cluster.RayConfig(num_cpus=THREADS, dashboard=False))
    tokens_cfg = TokensConfig(documents=str(docs_dir), tokenizer=str(tokenizer_dir), val_fraction=0.0,
                              actors=THREADS, actor_cpus=0.5, threads_per_actor=1)
    configs = {"llmray": tokens_cfg, "llmray_actors": dataclasses.replace(tokens_cfg, plan="actors")}
    results: dict[str, list[float]] = {"llmray": [], "llmray_actors": [], "tokenizers": [], "tokenizers_fast": []}
    counts: dict[str, int] = {}
    plans: dict[str, str] = {}
    for repeat in range(repeats):
        for name, cfg in configs.items():
            summary = run_stage("tokens", cfg, runs_root / name)
            counts[name], plans[name] = summary["tokens"]["train"], summary["plan"]
            results[name].append(summary["tokens"]["train"] / summary["seconds"])
        for name, fast in (("tokenizers", False), ("tokenizers_fast", True)):
            tokens, seconds = tokenizers_loop(files, tokenizer_dir, args.workdir / "peer.bin", fast)
            counts[name] = tokens
            results[name].append(tokens / seconds)
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1] / 1e6:.2f} M tok/s" for k, v in results.items()))
    if len(set(counts.values())) != 1:
        raise SystemExit(f"peers produced different token counts: {counts}")
    median = {name: statistics.median(values) for name, values in results.items()}
    mb_per_s = info["bytes"] / 1e6 / (counts["llmray"] / median["llmray"])
    print(json.dumps({
        "input_mb": round(info["bytes"] / 1e6, 2), "tokens": counts["llmray"], "threads": THREADS,
        "tokens_per_s": round(median["llmray"]), "mb_per_s": round(mb_per_s, 3),
        "tokenizers_tokens_per_s": round(median["tokenizers"]),
        "tokenizers_fast_tokens_per_s": round(median["tokenizers_fast"]),
        "ratio_vs_tokenizers": round(median["llmray"] / median["tokenizers"], 3),
        "ratio_vs_tokenizers_fast": round(median["llmray"] / median["tokenizers_fast"], 3), "plan": plans["llmray"],
        "actors_tokens_per_s": round(median["llmray_actors"]),
        "actors_ratio_vs_tokenizers_fast": round(median["llmray_actors"] / median["tokenizers_fast"], 3),
        "runs_tokens_per_s": {name: [round(v) for v in values] for name, values in results.items()},
        "bpe_train_seconds_32k": trained["train_seconds"], "bpe_train_chars": trained["train_chars"],
        "repeats": repeats, **load.fields()}))


if __name__ == "__main__":
    main()

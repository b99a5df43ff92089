"""Near-dedup throughput: llmray's MinHash LSH stage on Ray vs datasketch, scaling N/2N/4N,
and a run under a small object-store cap on input larger than the cap.

Input: real text (c4, Common Crawl text, Wikipedia paragraphs, Gutenberg chunks from
../shared/data and /usr/share/doc + pydoc topics from this machine), cut into documents of
at most 400 words, made into N documents (:func:`make_corpus`: 70% distinct variants, 30% near
copies, at every N) and written as parquet shards so every run reads from disk.

Peers, same data and parameters (word 5-grams of the same tokenisation, 112 permutations,
14 bands x 8 rows), same 2 CPUs:
* llmray: ``deduplicate`` with only MinHash on (exact and decontamination off), defaults
  otherwise (candidate edges verified by exact Jaccard; the plan chosen by size): read parquet
  one task per file as curate's readers do, signatures, band shuffle, verification joins,
  connected components, keep rule, filtered output counted. At N it also runs the plan that
  ``auto`` did not pick, and ``minhash.verify: false`` (band matches alone, datasketch's
  semantics).
* datasketch: ``MinHash.update_batch`` over the same shingle strings in a 2-process pool,
  ``MinHashLSH(params=(14, 8))`` insert + query, clusters by union-find.

Every time is the median of 3 runs. Last line: JSON with docs_per_s, datasketch_docs_per_s,
ratio_vs_datasketch, growth_4x (time(4N)/time(N)), the plan at N and the other plan's time, the
unverified figures, and the memory-capped run's figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _dedup_corpus import base_documents, run_datasketch, run_llmray, write_parquet
from _load import LoadWatch


ROUNDS = 3  # every figure is the median of this many runs


def make_corpus(base: list[str], n: int, seed: int) -> list[str]:
    """``n`` documents with the same duplicate structure at every ``n`` (so time(4N)/time(N)
    measures scaling, not a denser duplicate graph): 70% distinct documents (a real document with
    40% of its words replaced by real words, Jaccard ~0.01 to any other) and 30% near copies
    (0-5% of words replaced) of a document drawn from those made so far."""
    rng = random.Random(seed)
    vocabulary = [w for text in base[:2000] for w in text.split()]

    def edited(text: str, fraction: float) -> str:
        words = text.split()
        for i in rng.sample(range(len(words)), int(len(words) * fraction)):
            words[i] = rng.choice(vocabulary)
        return " ".join(words)

    out: list[str] = []
    while len(out) < n:
        if out and rng.random() < 0.3:
            out.append(edited(rng.choice(out), rng.choice([0.0, 0.01, 0.03, 0.05])))
        else:
            out.append(edited(rng.choice(base), 0.4))
    return out


def capped_run(directory: Path, cap_mb: int) -> dict:
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=cap_mb * 1024 * 1024, include_dashboard=False)
    elapsed, info, _ = run_llmray(directory)
    ray.shutdown()
    input_mb = sum(p.stat().st_size for p in directory.glob("*.parquet")) / 2**20
    return {"object_store_mb": cap_mb, "input_parquet_mb": round(input_mb, 1), "seconds": round(elapsed, 1), **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=5,000 documents and no capped run")
    parser.add_argument("--docs", type=int, default=50_000, help="N of the full run")
    parser.add_argument("--cap-mb", type=int, default=200, help="object store cap of the capped run")
    parser.add_argument("--capped-docs", type=int, default=120_000,
                        help="documents of the capped run (120,000 is ~335 MB of text; 0 skips it; "
                             "--quick skips it)")
    parser.add_argument("--capped-dir", help=argparse.SUPPRESS)  # internal: the capped run's child
    args = parser.parse_args()
    if args.capped_dir:
        print(json.dumps(capped_run(Path(args.capped_dir), args.cap_mb)))
        return
    load = LoadWatch(2)

    import ray

    n = 5_000 if args.quick else args.docs
    base = base_documents()
    print(f"base documents: {len(base)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="dedup_speed_"))
    corpora = {k: make_corpus(base, k * n, seed=k) for k in (1, 2, 4)}
    for k, texts in corpora.items():
        write_parquet(texts, work / f"n{k}")

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    run_llmray(work / "n1")  # warm-up: worker processes, imports

    def median_run(directory: Path, minhash: dict | None = None, **dedup) -> tuple[float, dict]:
        runs = [run_llmray(directory, minhash, **dedup)[:2] for _ in range(ROUNDS)]
        return statistics.median(t for t, _ in runs), runs[0][1]

    times, info = {}, {}
    for k in (1, 2, 4):
        times[k], info[k] = median_run(work / f"n{k}")
        print(f"llmray {k}N={k * n}: {times[k]:.2f}s {info[k]}", flush=True)
    other_plan = "distributed" if info[1]["plan"] == "local" else "local"
    other_time, other_info = median_run(work / "n1", plan=other_plan)
    print(f"llmray N={n}, plan {other_plan}: {other_time:.2f}s {other_info}", flush=True)
    unverified_time, unverified_info = median_run(work / "n1", {"verify": False})
    print(f"llmray unverified N={n}: {unverified_time:.2f}s {unverified_info}", flush=True)
    ray.shutdown()
    datasketch = [run_datasketch(work / "n1") for _ in range(ROUNDS)]
    ds_time, roots = statistics.median(t for t, _ in datasketch), datasketch[0][1]
    ds_rejected = sum(1 for i, root in enumerate(roots) if root != i)
    print(f"datasketch N={n}: {ds_time:.2f}s ({[round(t, 2) for t, _ in datasketch]}), rejected {ds_rejected}",
          flush=True)

    capped = {}
    if args.capped_docs and not args.quick:  # a fresh Ray whose object store is smaller than the input
        capped_texts = make_corpus(base, args.capped_docs, seed=99)
        write_parquet(capped_texts, work / "capped", shards=32)
        child = subprocess.run([sys.executable, __file__, "--capped-dir", str(work / "capped"),
                                "--cap-mb", str(args.cap_mb)], capture_output=True, text=True, check=True)
        capped = json.loads(child.stdout.strip().splitlines()[-1])
        capped["input_text_mb"] = round(sum(len(t.encode()) for t in capped_texts) / 2**20, 1)
        print(f"capped: {capped}", flush=True)

    docs_per_s = n / times[1]
    result = {"n": n, "docs_per_s": round(docs_per_s), "datasketch_docs_per_s": round(n / ds_time),
              "ratio_vs_datasketch": round(docs_per_s / (n / ds_time), 2),
              "growth_4x": round(times[4] / times[1], 2), "seconds": {f"{k}N": round(t, 2) for k, t in times.items()},
              "datasketch_seconds": round(ds_time, 2), "llmray_rejected_N": info[1]["rejected"],
              "plan_N": info[1]["plan"], f"{other_plan}_plan_seconds_N": round(other_time, 2),
              "unverified_docs_per_s": round(n / unverified_time),
              "unverified_ratio_vs_datasketch": round(ds_time / unverified_time, 2),
              "unverified_rejected_N": unverified_info["rejected"],
              "datasketch_rejected_N": ds_rejected, "capped_run": capped}
    print(json.dumps({**result, **load.fields()}))


if __name__ == "__main__":
    main()

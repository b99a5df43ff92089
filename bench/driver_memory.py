"""Driver memory of curate (with dedup) as the input grows 4×: the driver must hold plans and counts only.

    python bench/driver_memory.py            # 200 MB and 800 MB of JSONL text
    python bench/driver_memory.py --quick    # 20 MB and 80 MB (under 5 minutes idle)
    python bench/driver_memory.py --whole-cpus   # every task and actor asks for a whole CPU

Input: documents of real sentences (from ``_dedup_corpus.base_documents``: ../shared/data and
this machine's docs; see :func:`write_corpus`: prose that mostly passes the filters, 30% near
copies so that dedup has work), written as JSONL files of ~16 MB. Each size
runs ``llmray curate`` (normalize, heuristic filters, language ID, exact + MinHash dedup,
parquet output) in a fresh driver process on a fresh local Ray of 2 CPUs; the driver reports its
own peak resident set (``VmHWM`` of its process only: Ray's workers are other processes, which is
the point; not ``ru_maxrss``, which Linux carries across exec from this bench's process, so the
driver could never report less than the bench's own size) and the wall time of the stage.

``--whole-cpus``: curate's defaults ask for fractions of a CPU (two classifier actors at 0.5
beside read and clean tasks at 0.25-0.5), so four processes share the 2 cores and the 1-minute
load, which counts the bench's own processes, passes the idle bound (1.5x the cores) with nothing
else running. With this flag one classifier actor and every task ask for a whole CPU, at most two
processes compute at once, and the run can be judged idle; the driver's job (plans, refs,
counts) is the same.

Targets (issue: multi-node for real): driver peak RSS grows ≤ 1.2× while the input grows 4×;
wall time grows ≤ 4.4×. The peer is the same stage at the smaller size: there is no single-process
tool whose driver this would compare with. The last line printed is one JSON object:
``driver_peak_rss_mb`` (per size), ``rss_growth_4x``, ``time_growth_4x``, sizes, and the load fields.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _dedup_corpus import base_documents
from _load import LoadWatch

FILE_MB = 16
SENTENCE_END = re.compile(r"(?<=[a-z])\.\s+(?=[A-Z])")

# The measured driver: one curate stage on a fresh local Ray, then its own peak RSS and time.
DRIVER = """
import json, sys, time
from llmray import cluster, config as config_lib, stages
from llmray.process_memory import peak_resident_mb
raw, run_root = json.loads(sys.argv[1]), sys.argv[2]
stage = stages.STAGES["curate"]
start = time.perf_counter()
result = stages.run_stage(stage, config_lib.from_dict(stage.config_cls, raw), run_root,
                          cluster.RayConfig(num_cpus=2, dashboard=False))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_resident_mb(),
                  "summary": {k: result.manifest["summary"][k] for k in ("documents_in", "documents_out", "bytes_out")}}))
"""


def write_corpus(base: list[str], directory: Path, megabytes: int, seed: int) -> int:
    """JSONL files, ``megabytes`` of text in all; returns the number of documents. A document is 4-12
    sentences of real text drawn from the whole corpus, in paragraphs of 2-3 (so it reads as prose
    and most documents pass curate's filters, yet no two share more than a sentence by chance);
    30% are near copies of a recent document with one sentence replaced, for dedup to find."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for text in base for s in SENTENCE_END.split(text) if _prose(s)]

    def document() -> list[str]:
        return [rng.choice(sentences) for _ in range(rng.randint(4, 12))]

    def text_of(parts: list[str]) -> str:
        return "\n".join(" ".join(parts[i:i + 3]) for i in range(0, len(parts), 3))

    directory.mkdir(parents=True)
    written = count = index = 0
    recent: list[list[str]] = []
    handle = None
    while written < megabytes << 20:
        if handle is None or handle.tell() >= FILE_MB << 20:
            if handle is not None:
                handle.close()
            handle = open(directory / f"part-{index:04d}.jsonl", "w", encoding="utf-8")
            index += 1
        if recent and rng.random() < 0.3:
            parts = list(rng.choice(recent))
            parts[rng.randrange(len(parts))] = rng.choice(sentences)
        else:
            parts = document()
            recent = (recent + [parts])[-5000:]
        line = json.dumps({"text": text_of(parts)}) + "\n"
        handle.write(line)
        written += len(line.encode())
        count += 1
    handle.close()
    return count


def _prose(sentence: str) -> bool:
    """A sentence of 6-60 words nearly all alphabetic (man pages and code samples are not)."""
    words = sentence.split()
    return 6 <= len(words) <= 60 and sum(any(c.isalpha() for c in w) for w in words) >= 0.95 * len(words)


WHOLE_CPUS = {"read_cpus": 1, "clean_cpus": 1, "actors": 1, "actor_cpus": 1}


def curate_config(corpus: Path, whole_cpus: bool = False) -> dict:
    return {"sources": [{"name": "web", "kind": "jsonl", "paths": [str(corpus)]}],
            "dedup": {"exact": True, "minhash": {"enabled": True}, "decontam": {"enabled": False}},
            **({"execution": WHOLE_CPUS} if whole_cpus else {})}


def run_driver(corpus: Path, run_root: Path, whole_cpus: bool) -> dict:
    raw = curate_config(corpus, whole_cpus)
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(raw), str(run_root)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"curate failed on {corpus}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 MB and 80 MB instead of 200 MB and 800 MB")
    parser.add_argument("--megabytes", type=int, default=200, help="the smaller input (the larger is 4×)")
    parser.add_argument("--whole-cpus", action="store_true", help="one classifier actor, every task and actor "
                                                                  "asking for a whole CPU (see above)")
    args = parser.parse_args()
    small = 20 if args.quick else args.megabytes
    load = LoadWatch(2)
    base = base_documents()
    work = Path(tempfile.mkdtemp(prefix="driver_memory_"))
    try:
        results = {}
        for megabytes in (small, 4 * small):
            corpus = work / f"corpus-{megabytes}mb"
            documents = write_corpus(base, corpus, megabytes, seed=megabytes)
            run = run_driver(corpus, work / f"runs-{megabytes}mb", args.whole_cpus)
            results[megabytes] = {"documents": documents, **run}
            print(f"{megabytes} MB, {documents:,} documents: {run['seconds']:.1f} s, driver peak RSS "
                  f"{run['peak_rss_mb']:.0f} MB, {run['summary']}", flush=True)
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, four = results[small], results[4 * small]
    print(json.dumps({
        "input_mb": [small, 4 * small], "whole_cpus": args.whole_cpus, "documents": [one["documents"], four["documents"]],
        "driver_peak_rss_mb": [round(one["peak_rss_mb"], 1), round(four["peak_rss_mb"], 1)],
        "seconds": [round(one["seconds"], 1), round(four["seconds"], 1)],
        "rss_growth_4x": round(four["peak_rss_mb"] / one["peak_rss_mb"], 3),
        "time_growth_4x": round(four["seconds"] / one["seconds"], 3),
        "documents_out": [one["summary"]["documents_out"], four["summary"]["documents_out"]],
        **load.fields()}))


if __name__ == "__main__":
    main()

"""Normalization + heuristic filters + language ID: llmray vs datatrove, per core, same input.

    python bench/curate_filters.py            # ≥50 MB of real text
    python bench/curate_filters.py --quick    # ~5 MB, same comparison (under 5 minutes idle)

Input: real documents from ../shared/data (Common Crawl text and WARC pages, C4, Wikipedia,
Gutenberg books) topped up with the machine-local corpus (docs, man pages, pydoc topics, Python
sources) to the target size, read with llmray's own readers and written once to
bench/out/curate_filters_input.jsonl so both sides see identical text.

Timing is one process per side (so docs/s is per core), one thread each, alternating sides
``--repeats`` times and reporting medians:

* llmray: ``normalize`` → Gopher repetition → Gopher quality → C4 → FineWeb (stop at the first
  failing group) → fastText LID on the survivors, batched;
* datatrove 0.10.1: the same four filters and its ``LanguageFilter`` with the same
  ``lid.176.ftz`` (see bench/datatrove_peer.py; it runs in its own venv, created here on first use
  under bench/out/, because datatrove's fastText wheel would overwrite llmray's).

Agreement: on ``--agreement-docs`` documents spread over the input, each rule group is evaluated
independently by both implementations on the same normalized text, and the share of documents
on which they decide the same is reported per group.

The last line printed is one JSON object: ``docs_per_s_per_core``,
``datatrove_docs_per_s_per_core``, ``ratio_vs_datatrove``, ``mb_per_s_per_core``, agreement per
group, sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _load import LoadWatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmray.data.filters import classifiers, normalize  # noqa: E402
from llmray.data.filters import heuristics as filters  # noqa: E402
from llmray.data.readers import sources  # noqa: E402

OUT = REPO / "bench" / "out"
PEER_VENV = OUT / "datatrove-venv"
PEER_PACKAGES = ["datatrove[processing]==0.10.1", "spacy"]
SHARED = REPO.parent / "shared" / "data"
GROUPS = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
LID_BATCH = 256


def shared_sources() -> list[sources.SourceConfig]:
    def source(name, kind, path, **extra):
        return sources.SourceConfig(name=name, kind=kind, paths=[str(SHARED / path)], optional=True, **extra)

    return [source("web_cc_text", "jsonl", "web_cc_text"), source("c4", "jsonl", "c4_sample"),
            source("web_cc_warc", "warc", "web_cc_warc/resiliparse_warcfile.warc.gz"),
            source("wikipedia", "text", "wikipedia_sample", split="line"),
            source("books", "text", "books_gutenberg", strip_gutenberg=True)]


def collect(target_bytes: int, path: Path) -> tuple[int, int]:
    """Write real documents (shared data, then machine text) until ``target_bytes``; return (docs, bytes)."""
    machine = sources.SourceConfig(name="machine", kind="machine",
                                   machine_kinds=["pydoc_topics", "doc", "man", "python_stdlib"])
    limits = sources.ReadLimits()
    docs = size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for source in shared_sources() + [machine]:
            for unit in sources.plan([source]):
                for row in sources.read_unit(unit, source, limits):
                    if row["error"] is None and row["text"].strip():
                        handle.write(json.dumps({"text": row["text"]}, ensure_ascii=False) + "\n")
                        docs, size = docs + 1, size + row["bytes"]
                    if size >= target_bytes:
                        return docs, size
    return docs, size


def load(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def llmray_speed(texts: list[str], lid_model) -> dict:
    cfg = filters.FilterConfig()
    lid = classifiers.LanguageIDConfig()
    started = time.perf_counter()
    survivors, kept = [], 0
    for text in texts:
        text = normalize.normalize(text)
        if text and filters.apply_filters(text, GROUPS, cfg).reason is None:
            survivors.append(text)
    for i in range(0, len(survivors), LID_BATCH):
        for lang, score in classifiers.predict_language(lid_model, survivors[i:i + LID_BATCH], lid.max_chars):
            kept += lang in lid.languages and score >= lid.min_score
    return {"docs": len(texts), "seconds": time.perf_counter() - started, "kept": kept}


def ensure_peer_venv() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV} with {' '.join(PEER_PACKAGES)} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def peer(python: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(python), str(REPO / "bench" / "datatrove_peer.py"), *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"datatrove peer failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def agreement(python: Path, texts: list[str], count: int, lid_model_path: Path, lid_model) -> dict:
    step = max(1, len(texts) // count)
    sample = [t for t in (normalize.normalize(t) for t in texts[::step][:count]) if t]
    sample_file = OUT / "curate_filters_agreement.jsonl"
    sample_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sample),
                           encoding="utf-8")
    decisions_file = OUT / "curate_filters_datatrove_decisions.jsonl"
    peer(python, "decisions", str(sample_file), str(lid_model_path), str(decisions_file))
    theirs = [json.loads(line) for line in decisions_file.read_text().splitlines()]
    cfg = filters.FilterConfig()
    lid = classifiers.LanguageIDConfig()
    ours = [{name: filters.GROUPS[name](filters.TextView(t), getattr(cfg, name)) is None for name in GROUPS}
            for t in sample]
    # datatrove's language filter reads the whole document; ours the first lid.max_chars characters.
    for row, (lang, score) in zip(ours, classifiers.predict_language(lid_model, sample, lid.max_chars)):
        row["lid"] = lang in lid.languages and score > lid.min_score
    result = {"docs": len(sample)}
    for name in GROUPS + ["lid"]:
        same = sum(a[name] == b[name] for a, b in zip(ours, theirs))
        result[name] = round(same / len(sample), 4)
        result[f"{name}_kept_llmray"] = sum(a[name] for a in ours)
        result[f"{name}_kept_datatrove"] = sum(b[name] for b in theirs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="~5 MB input instead of 50 MB")
    parser.add_argument("--target-mb", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timing rounds per side (medians)")
    parser.add_argument("--agreement-docs", type=int, default=1200)
    args = parser.parse_args()
    watch = LoadWatch(2)
    os.environ["OMP_NUM_THREADS"] = "1"
    target = int((args.target_mb or (5 if args.quick else 50)) * 1e6)
    input_file = OUT / "curate_filters_input.jsonl"
    docs, size = collect(target, input_file)
    print(f"input: {docs:,} documents, {size / 1e6:.1f} MB -> {input_file}", flush=True)
    texts = load(input_file)
    python = ensure_peer_venv()
    lid_path = classifiers.bundled_lid_model()
    lid_model = classifiers.load_model(lid_path)
    ours, theirs = [], []
    for round_ in range(args.repeats):
        ours.append(llmray_speed(texts, lid_model))
        print(f"round {round_}: llmray {ours[-1]}", flush=True)
        theirs.append(json.loads(peer(python, "speed", str(input_file), str(lid_path))))
        print(f"round {round_}: datatrove {theirs[-1]}", flush=True)
    ours_s = statistics.median(r["seconds"] for r in ours)
    theirs_s = statistics.median(r["seconds"] for r in theirs)
    agree = agreement(python, texts, args.agreement_docs, lid_path, lid_model)
    print(f"agreement per rule group on {agree['docs']} documents: "
          + ", ".join(f"{g} {agree[g]:.3f}" for g in GROUPS + ["lid"]), flush=True)
    result = {
        "input_docs": docs, "input_mb": round(size / 1e6, 2), "repeats": args.repeats,
        "docs_per_s_per_core": round(docs / ours_s, 1), "mb_per_s_per_core": round(size / 1e6 / ours_s, 3),
        "datatrove_docs_per_s_per_core": round(docs / theirs_s, 1),
        "datatrove_mb_per_s_per_core": round(size / 1e6 / theirs_s, 3),
        "ratio_vs_datatrove": round(theirs_s / ours_s, 2),
        "kept_llmray": ours[0]["kept"], "kept_datatrove": theirs[0]["kept"],
        "agreement": {g: agree[g] for g in GROUPS + ["lid"]}, "agreement_docs": agree["docs"],
        "agreement_detail": agree,
    }
    print(json.dumps({**result, **watch.fields()}))


if __name__ == "__main__":
    main()

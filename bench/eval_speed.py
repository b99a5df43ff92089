"""Evaluation throughput: log-likelihood requests per second on 1 vs 2 Ray actors (issue 10).

Model: a randomly initialised preset (default ``cpu-small``, 12.6M parameters; scores do not
matter for speed) exported in HF layout with a BPE tokenizer trained here on real text.
Requests: ARC-Easy dev (+ PIQA in the full run), zero-shot, built and batched exactly as
``llmray eval`` does. Each actor holds the model and uses one torch thread, 0.5 CPU reserved.
Pools are created and warmed up first (model loading is not timed), then timed runs alternate
between the 1-actor and the 2-actor pool; medians are reported. For context the same batches
also run in-process with 2 torch threads (one process using both cores the torch way).

    python bench/eval_speed.py            # full: ARC-Easy dev + PIQA (5,956 requests), 3 rounds
    python bench/eval_speed.py --quick    # 150 ARC-Easy questions (600 requests), 3 rounds

The last line printed is one JSON object: req_per_s_1, req_per_s_2, speedup_2_actors, ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _load import LoadWatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llmray import cluster  # noqa: E402
from llmray.eval.runner import RunnerConfig, WorkerPool, make_batches, plan_requests, worker_args  # noqa: E402
from llmray.eval.tasks import TaskSpec, load_task  # noqa: E402
from llmray.model import hf, llama  # noqa: E402
from llmray.model.config import preset  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.eval_support import save_tokenizer, train_bpe  # noqa: E402


def build_model(directory: Path, preset_name: str) -> Path:
    cfg = preset(preset_name)
    text = (SHARED_DATA / "wikipedia_sample" / "wiki_demo.txt").read_text(encoding="utf-8")[:400_000]
    tokenizer_dir = save_tokenizer(train_bpe(text.splitlines(), cfg.vocab_size), directory / "tokenizer")
    torch.manual_seed(0)
    return hf.export(directory / "model", cfg, llama.build(cfg).state_dict(), tokenizer_dir=tokenizer_dir)


def timed(pool: WorkerPool, batches: list) -> float:
    started = time.perf_counter()
    pool.map(batches)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="150 ARC-Easy questions instead of ARC-Easy + PIQA")
    parser.add_argument("--preset", default="cpu-small", help="model preset (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per pool (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=RunnerConfig().batch_size,
                        help="most requests per batch (default: the runner's, %(default)s)")
    args = parser.parse_args()
    load = LoadWatch(os.cpu_count() or 1)

    tasks = [load_task("arc_easy", TaskSpec(format="arc", path="arc/ARC-Easy-Dev.jsonl"), SHARED_DATA,
                       limit=150 if args.quick else None)]
    if not args.quick:
        tasks.append(load_task("piqa", TaskSpec(format="piqa", path="piqa/valid.jsonl",
                                                labels_path="piqa/valid-labels.lst"), SHARED_DATA))
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        model_dir = build_model(Path(tmp), args.preset)
        plan = plan_requests(model_dir, tasks)
        base = RunnerConfig(batch_size=args.batch_size, num_cpus_per_actor=0.5, threads_per_actor=1)
        order = make_batches(plan.requests, base, plan.info.max_seq_len)
        batches = [[plan.requests[i] for i in batch] for batch in order]
        tokens = sum(r.length for r in plan.requests)
        print(f"{len(plan.requests)} requests ({tokens} tokens) in {len(batches)} batches, model {args.preset}, "
              f"{os.cpu_count()} CPUs", flush=True)

        cluster.connect(cluster.RayConfig(num_cpus=os.cpu_count(), dashboard=False))
        configs = {n: dataclasses.replace(base, num_actors=n) for n in (1, 2)}
        pools = {n: WorkerPool(worker_args(model_dir, plan.info, c), c) for n, c in configs.items()}
        for n, pool in pools.items():  # load the model in every actor and run one batch each
            pool.map(batches[:n])
        seconds: dict[int, list[float]] = {1: [], 2: []}
        for round_index in range(args.rounds):
            for n in (1, 2):
                seconds[n].append(timed(pools[n], batches))
                print(f"round {round_index + 1}: {n} actor(s) {seconds[n][-1]:.2f}s", flush=True)
        for pool in pools.values():
            pool.close()

        torch.set_num_threads(2)
        local = RunnerConfig(num_actors=0)
        in_process = WorkerPool(worker_args(model_dir, plan.info, local), local)
        in_process.map(batches[:1])
        local_seconds = statistics.median(timed(in_process, batches) for _ in range(args.rounds))

    median = {n: statistics.median(s) for n, s in seconds.items()}
    result = {
        "preset": args.preset, "quick": args.quick, "requests": len(plan.requests), "tokens": tokens,
        "batches": len(batches), "rounds": args.rounds,
        "req_per_s_1": round(len(plan.requests) / median[1], 1),
        "req_per_s_2": round(len(plan.requests) / median[2], 1),
        "speedup_2_actors": round(median[1] / median[2], 3),
        "req_per_s_in_process_2_threads": round(len(plan.requests) / local_seconds, 1),
        "seconds_1": [round(s, 2) for s in seconds[1]], "seconds_2": [round(s, 2) for s in seconds[2]],
    }
    print(json.dumps({**result, **load.fields()}))


if __name__ == "__main__":
    main()

"""Overhead of `llmray pretrain` (Ray Train + the training core) vs a bare PyTorch loop, and DP=2 scaling.

    python bench/train_overhead.py [--quick]

Same model (``cpu-small``, fp32), batch (micro-batch 8 × seq 256), data (the real TokenLoader on
byte-level shards of this machine's Python sources), optimizer (AdamW, grad clip 1.0):

* **bare**: a plain loop written below (loader → forward → cross-entropy → backward → clip →
  AdamW step), in this process with 2 torch threads;
* **llmray 1 worker**: the pretrain worker function on Ray Train, 1 worker × 2 CPUs × 2 threads;
* **llmray DP=2**: 2 FSDP2 workers × 1 CPU × 1 thread each (the two cores split between ranks).

Throughput is wall clock over the steady-state steps (after ``warmup`` steps, before the last,
which also evaluates and exports): for the bare loop the sum of its step times, for llmray the
difference of the ``time`` stamps rank 0 writes to metrics.jsonl, so everything the trainer does
between steps (Ray Train reports, metrics, TensorBoard) is counted. One untimed Ray Train run
comes first: the first Train run of a fresh Ray session competes with Ray starting Train's helper
processes (measured: 3.5-4.6 s/step for its first 20 steps, then 1.1 s/step), a one-off cost
reported apart (``first_ray_train_run_tokens_per_s``) rather than mixed into the steady state.
``ratio_vs_bare_loop`` = llmray 1 worker / bare; ``dp2_scaling`` = DP=2 / 1 worker (both use all
of the 2 cores, so 1.0 is the ideal the cores allow). Medians over rounds. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _byte_shards  # noqa: E402
from _load import LoadWatch  # noqa: E402

from llmray import cluster  # noqa: E402
from llmray.model import llama  # noqa: E402
from llmray.model.config import preset  # noqa: E402
from llmray.parallel import ParallelConfig  # noqa: E402
from llmray.tokens.loader import TokenLoader  # noqa: E402
from llmray.train.launch import BatchConfig, ExecutionConfig, launch  # noqa: E402
from llmray.train.objectives import token_cross_entropy  # noqa: E402
from llmray.train.pretrain import PretrainConfig, TokensInput, pretrain_job  # noqa: E402
from llmray.train.schedule import ScheduleConfig  # noqa: E402
from llmray.train.trainer import OptimizerConfig, TrainConfig, parameter_groups  # noqa: E402

SEQ, BATCH = 256, 8


def bare_loop(shards: Path, steps: int, warmup: int, threads: int) -> float:
    """tokens/s of a plain PyTorch training loop (steps after warm-up, but the last)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = llama.build(preset("cpu-small"))
    opt_cfg = OptimizerConfig(lr=1e-3)
    optimizer = torch.optim.AdamW(parameter_groups(model, opt_cfg), lr=opt_cfg.lr,
                                  betas=(opt_cfg.beta1, opt_cfg.beta2), foreach=True)
    loader = TokenLoader(shards, seq_len=SEQ, batch_size=BATCH, seed=0)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(loader)
        loss = token_cross_entropy(model(batch[:, :-1]), batch[:, 1:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - start)
    steady = times[warmup:-1]
    return BATCH * SEQ * len(steady) / sum(steady)


def llmray_run(shards: Path, work: Path, name: str, steps: int, warmup: int, workers: int) -> float:
    """tokens/s (global) of the pretrain worker on Ray Train, wall clock from step ``warmup`` to the last but one."""
    cfg = PretrainConfig(
        model=preset("cpu-small"), data=TokensInput(tokens=str(shards)),
        batch=BatchConfig(seq_len=SEQ, micro_batch_size=BATCH),
        train=TrainConfig(steps=steps, optimizer=OptimizerConfig(lr=1e-3), schedule=ScheduleConfig(warmup_steps=2),
                          log_every=1, eval_batches=1, checkpoint_every=0, peak_flops=1e11),
        parallel=ParallelConfig(strategy="fsdp2"),
        execution=ExecutionConfig(launcher="ray_train", workers=workers, cpus_per_worker=2 / workers,
                                  threads_per_worker=max(1, 2 // workers), max_failures=0))
    metrics = work / f"{name}.jsonl"
    launch(pretrain_job(cfg, work / "ray" / name, metrics), connect_ray=lambda: None)
    stamps = {m["step"]: m["time"] for m in map(json.loads, metrics.read_text().splitlines())}
    tokens_per_step = BATCH * SEQ * workers
    return tokens_per_step * (steps - 1 - warmup) / (stamps[steps - 1] - stamps[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one round (under 5 minutes)")
    args = parser.parse_args()
    load = LoadWatch(2)
    steps, warmup, rounds = (10, 3, 1) if args.quick else (30, 5, 3)
    cluster.connect(cluster.RayConfig(num_cpus=2, dashboard=False, object_store_memory_mb=256))
    results = {"bare": [], "one": [], "dp2": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = _byte_shards.write(work / "shards", max_bytes=4_000_000)
        first_run = llmray_run(shards, work, "first", steps, warmup, workers=1)
        for r in range(rounds):  # alternate the peers so load changes hit all of them
            results["bare"].append(bare_loop(shards, steps, warmup, threads=2))
            results["one"].append(llmray_run(shards, work, f"one-{r}", steps, warmup, workers=1))
            results["dp2"].append(llmray_run(shards, work, f"dp2-{r}", steps, warmup, workers=2))
            print(f"round {r}: bare {results['bare'][-1]:.0f}, llmray 1 worker {results['one'][-1]:.0f}, "
                  f"DP=2 {results['dp2'][-1]:.0f} tokens/s", flush=True)
    bare, one, dp2 = (statistics.median(results[k]) for k in ("bare", "one", "dp2"))
    print(json.dumps({"model": "cpu-small", "seq_len": SEQ, "micro_batch": BATCH, "steps": steps, "rounds": rounds,
                      "threads": {"bare": 2, "one_worker": 2, "dp2_per_worker": 1},
                      "tokens_per_s": round(one, 1), "bare_tokens_per_s": round(bare, 1),
                      "dp2_tokens_per_s": round(dp2, 1), "ratio_vs_bare_loop": round(one / bare, 3),
                      "dp2_scaling": round(dp2 / one, 3), "first_ray_train_run_tokens_per_s": round(first_run, 1),
                      "rounds_tokens_per_s": {k: [round(v) for v in vs] for k, vs in results.items()},
                      **load.fields()}))


if __name__ == "__main__":
    main()

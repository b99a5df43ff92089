"""Overhead of `llmray pretrain` (Ray Train + the training core) vs a bare PyTorch loop, and DP=2 scaling.

    python bench/train_overhead.py [--quick]

Same model (``cpu-small``, fp32), batch (micro-batch 8 × seq 256), data (the real TokenLoader on
byte-level shards of this machine's Python sources), optimizer (AdamW, grad clip 1.0):

* **bare**: a plain loop written below (loader → forward → cross-entropy → backward → clip →
  AdamW step, torch's default AdamW kernel: on CPU the per-tensor loop), in this process with 2
  torch threads;
* **llmray 1 worker**: the pretrain worker function on Ray Train, 1 worker × 2 CPUs × 2 threads;
* **llmray DP=2**: 2 FSDP2 workers × 1 CPU × 1 thread each (the two cores split between ranks).

Throughput is wall clock over the same steady-state steps for every peer (:func:`timed_steps`:
from the first log step after warm-up to the last log step before the final step, which also
evaluates and exports): for the bare loop its own clock, for llmray the difference of the
``time`` stamps rank 0 writes to metrics.jsonl, so everything the trainer does between steps (Ray
Train reports, metrics, TensorBoard) is counted. The trainer logs every ``LOG_EVERY`` = 5 steps,
as runs do (the shipped configs log every 5 or 10). One untimed Ray Train run comes first: the
first Train run of a fresh Ray session competes with Ray starting Train's helper processes
(measured: 3.5-4.6 s/step for its first 20 steps, then 1.1 s/step), a one-off cost reported apart
(``first_ray_train_run_tokens_per_s``) rather than mixed into the steady state.
llmray's own kernels count as llmray's: its chunked, fused head + cross-entropy and its fused AdamW
(4 ms a step for this model on 2 cores, against 12.5 ms for torch's default loop and 22 ms for
foreach) are what a user of ``llmray pretrain`` gets. ``ratio_vs_bare_loop`` is the median over
rounds of llmray 1 worker / bare in the same round (this machine's speed drifts by ±20% between
minutes, so each ratio compares neighbouring runs);
``ratio_of_medians`` is given too. Before each run the bench waits for the 1-minute load to settle
(:meth:`LoadWatch.settle`; ``settled_s`` in the JSON), so no run starts while the previous one's
processes still weigh on the machine. ``dp2_scaling`` = DP=2 / 1 worker (both use all of the 2 cores,
so 1.0 is the ideal the cores allow; full runs only). Last line: one JSON object.
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


LOG_EVERY = 5  # metrics (and Ray Train reports) every 5 steps, as a run logs; 1 would report every step


def timed_steps(steps: int, warmup: int) -> range:
    """The steps both peers time: from the first log step at or after ``warmup`` to the last log
    step before the final one (which also evaluates and exports)."""
    first = -(-warmup // LOG_EVERY) * LOG_EVERY
    last = (steps - 1) // LOG_EVERY * LOG_EVERY
    return range(first, last)


def bare_loop(shards: Path, steps: int, warmup: int, threads: int) -> float:
    """tokens/s of a plain PyTorch training loop over :func:`timed_steps` (wall clock)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = llama.build(preset("cpu-small"))
    opt_cfg = OptimizerConfig(lr=1e-3)
    optimizer = torch.optim.AdamW(parameter_groups(model, opt_cfg), lr=opt_cfg.lr,
                                  betas=(opt_cfg.beta1, opt_cfg.beta2))  # torch's default kernel
    loader = TokenLoader(shards, seq_len=SEQ, batch_size=BATCH, seed=0)
    timed = timed_steps(steps, warmup)
    for step in range(1, steps + 1):  # step numbers as the trainer counts them
        if step == timed.start + 1:
            start = time.perf_counter()
        batch = next(loader)
        loss = token_cross_entropy(model(batch[:, :-1]), batch[:, 1:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the host sync the trainer makes at log steps, every step here
        if step == timed.stop:
            return BATCH * SEQ * len(timed) / (time.perf_counter() - start)
    raise ValueError(f"{steps} steps leave no timed step after warm-up {warmup}")


def llmray_run(shards: Path, work: Path, name: str, steps: int, warmup: int, workers: int) -> float:
    """tokens/s (global) of the pretrain worker on Ray Train over :func:`timed_steps`, from the
    ``time`` stamps rank 0 writes to metrics.jsonl at log steps."""
    cfg = PretrainConfig(
        model=preset("cpu-small"), data=TokensInput(tokens=str(shards)),
        batch=BatchConfig(seq_len=SEQ, micro_batch_size=BATCH),
        train=TrainConfig(steps=steps, optimizer=OptimizerConfig(lr=1e-3), schedule=ScheduleConfig(warmup_steps=2),
                          log_every=LOG_EVERY, eval_batches=1, checkpoint_every=0, peak_flops=1e11,
                          precision="fp32"),  # the bare loop's precision
        parallel=ParallelConfig(strategy="fsdp2"),
        execution=ExecutionConfig(launcher="ray_train", workers=workers, cpus_per_worker=2 / workers,
                                  threads_per_worker=max(1, 2 // workers), max_failures=0))
    metrics = work / f"{name}.jsonl"
    launch(pretrain_job(cfg, work / "ray" / name, metrics), connect_ray=lambda: None)
    stamps = {m["step"]: m["time"] for m in map(json.loads, metrics.read_text().splitlines())}
    timed = timed_steps(steps, warmup)
    return BATCH * SEQ * workers * len(timed) / (stamps[timed.stop] - stamps[timed.start])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 steps, 3 rounds, no DP=2 (under 5 minutes)")
    parser.add_argument("--no-dp2", action="store_true",
                        help="full run without the DP=2 peer (the 1 worker / bare loop figure alone)")
    args = parser.parse_args()
    load = LoadWatch(2)
    steps, warmup, rounds = (16, 3, 3) if args.quick else (31, 5, 5)
    cluster.connect(cluster.RayConfig(num_cpus=2, dashboard=False, object_store_memory_mb=256))
    results: dict[str, list[float]] = {"bare": [], "one": []}
    if not (args.quick or args.no_dp2):
        results["dp2"] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = _byte_shards.write(work / "shards", max_bytes=4_000_000)
        first_run = llmray_run(shards, work, "first", steps, warmup, workers=1)
        for r in range(rounds):  # alternate the peers so load changes hit all of them
            load.settle()
            results["bare"].append(bare_loop(shards, steps, warmup, threads=2))
            load.settle()
            results["one"].append(llmray_run(shards, work, f"one-{r}", steps, warmup, workers=1))
            if "dp2" in results:
                load.settle()
                results["dp2"].append(llmray_run(shards, work, f"dp2-{r}", steps, warmup, workers=2))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()) + " tokens/s", flush=True)
    medians = {k: statistics.median(v) for k, v in results.items()}
    round_ratios = [one / bare for one, bare in zip(results["one"], results["bare"])]
    print(json.dumps({"model": "cpu-small", "seq_len": SEQ, "micro_batch": BATCH, "steps": steps, "rounds": rounds,
                      "timed_steps": len(timed_steps(steps, warmup)), "log_every": LOG_EVERY,
                      "threads": {"bare": 2, "one_worker": 2, "dp2_per_worker": 1},
                      "tokens_per_s": round(medians["one"], 1), "bare_tokens_per_s": round(medians["bare"], 1),
                      "ratio_vs_bare_loop": round(statistics.median(round_ratios), 3),
                      "round_ratios": [round(x, 3) for x in round_ratios],
                      "ratio_of_medians": round(medians["one"] / medians["bare"], 3),
                      **({"dp2_tokens_per_s": round(medians["dp2"], 1),
                          "dp2_scaling": round(medians["dp2"] / medians["one"], 3)} if "dp2" in medians else {}),
                      "first_ray_train_run_tokens_per_s": round(first_run, 1),
                      "rounds_tokens_per_s": {k: [round(v) for v in vs] for k, vs in results.items()},
                      **load.fields()}))


if __name__ == "__main__":
    main()

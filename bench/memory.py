"""Per-rank memory of each training layout on 2 CPU ranks, measured against one process and against `llmray plan`.

    python bench/memory.py [--quick]

A ~400M-parameter Llama (``--quick``: ~100M; fp32 state ~6.4 GB in one process) trains 3 steps in
each layout: one process; FSDP2 dp=2; DeepSpeed ZeRO-3 dp=2; tp=2; pp=2 (1F1B, 2 micro-batches),
2 ranks each (gloo, 1 thread per rank), fp32, AdamW, a global batch of 2 rows × 256 tokens. The
model is built on ``meta`` and handed to the Trainer, as ``llmray pretrain`` does, so sharded
layouts initialize only their shards. Per rank: the peak resident memory after the Trainer is
built (initialization) and after 3 steps, each minus the rank's resident memory before the model
existed (imports and the process group); the larger rank is reported. ``ratio_vs_single``: a
layout's peak over the single process's (targets: ≤ 0.6 after init, ≤ 0.65 after 3 steps);
``planner_error``: the planner's total for the larger rank over the measured peak after 3 steps,
minus 1 (target: within ±0.2). Last line: JSON with ``peak_rss_gb``, ``ratio_vs_single`` and
``planner_error`` per layout.

Every rank runs with glibc's mmap threshold fixed at 128 KiB (``ALLOCATOR``), so freed tensors go
back to the system and resident memory tracks live tensors. Measured on the ~400M model, one
process peaked at 8.28 GB with a 1 MiB threshold and at 6.67 GB with this one, against 6.60 GB
of parameters, gradients and AdamW states; with glibc's default (a threshold that grows to 32 MiB
as buffers are freed) FSDP2's per-step gather-and-free churn stays resident as well. A layout's
library (DeepSpeed for ZeRO-3) is imported before the baseline is taken, like torch: its ~0.14 GB
does not grow with the model.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import LoadWatch  # noqa: E402
from _random_tokens import RandomTokens  # noqa: E402

from llmray import process_memory  # noqa: E402

SEQ, GLOBAL_ROWS, STEPS = 256, 2, 3
FULL = dict(vocab_size=32000, dim=1024, n_layers=32, n_heads=16, n_kv_heads=8, ffn_hidden_dim=2816,
            max_seq_len=SEQ, tie_embeddings=False)
QUICK = dict(FULL, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden_dim=2048)
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
LAYOUTS = {  # name: (ranks, ParallelConfig keyword arguments)
    "single": (1, {"strategy": "none"}),
    "fsdp2_dp2": (2, {}),
    "zero3_dp2": (2, {"strategy": "deepspeed", "zero_stage": 3}),
    "tp2": (2, {"tp": 2}),
    "pp2": (2, {"pp": 2, "pipeline": {"schedule": "1f1b", "microbatches": 2}}),
}


def resident_gb() -> float:
    return process_memory.resident_mb() / 1024


def peak_gb() -> float:
    return process_memory.peak_resident_mb() / 1024


def rank_main(rank: int, world: int, port: int, shape: dict, parallel_kwargs: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from llmray import config as config_lib
    from llmray.model import llama
    from llmray.model.config import preset
    from llmray.parallel import ParallelConfig
    from llmray.train.objectives import CausalLM
    from llmray.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1 if world > 1 else 2)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel = config_lib.from_dict(ParallelConfig, parallel_kwargs)
    dims = parallel.dims(world)
    cfg = preset("tiny", **shape)
    if parallel.strategy == "deepspeed":  # a library's import is part of the baseline, as torch's is
        from llmray.parallel import deepspeed
        deepspeed.load()
    base = resident_gb()
    trainer = Trainer(TrainConfig(steps=STEPS, precision="fp32", log_every=1000), llama.build(cfg, "meta"),
                      CausalLM(), RandomTokens(cfg.vocab_size, GLOBAL_ROWS, SEQ, dims.coordinates(rank)["dp"], dims.dp),
                      parallel=parallel, device=torch.device("cpu"))
    after_init = peak_gb() - base
    trainer.fit()
    result = {"init_gb": after_init, "steps_gb": peak_gb() - base}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def measure(name: str, shape: dict) -> dict:
    import torch.multiprocessing as mp

    ranks, parallel_kwargs = LAYOUTS[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(rank_main, args=(ranks, port, shape, parallel_kwargs, tmp), nprocs=ranks,
                           start_method="spawn")
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"init_gb": max(r["init_gb"] for r in per_rank), "steps_gb": max(r["steps_gb"] for r in per_rank)}


def planned_gb(name: str, shape: dict) -> float:
    from llmray import config as config_lib
    from llmray.model.config import preset
    from llmray.parallel import ParallelConfig
    from llmray.train import memory_plan

    ranks, parallel_kwargs = LAYOUTS[name]
    parallel = config_lib.from_dict(ParallelConfig, parallel_kwargs)
    rows = GLOBAL_ROWS // parallel.dims(ranks).dp
    plans = memory_plan.plan(preset("tiny", **shape), parallel, ranks, seq_len=SEQ, micro_batch_size=rows,
                             compute_bytes=4)
    return max(p.total for p in plans) / 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~100M model (under 5 minutes)")
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = parser.parse_args()
    load = LoadWatch(2)
    os.environ.update(ALLOCATOR)  # read by glibc in each spawned rank
    shape = QUICK if args.quick else FULL
    from llmray.model.config import preset

    params = preset("tiny", **shape).num_params()
    results = {name: measure(name, shape) for name in args.layouts}
    single = results.get("single")
    figures = {"params_m": round(params / 1e6, 1), "peak_rss_gb": {}, "ratio_vs_single": {}, "planner_error": {}}
    for name, measured in results.items():
        figures["peak_rss_gb"][name] = {k: round(v, 3) for k, v in measured.items()}
        if single and name != "single":
            figures["ratio_vs_single"][name] = {k: round(measured[k] / single[k], 3) for k in measured}
        figures["planner_error"][name] = round(planned_gb(name, shape) / measured["steps_gb"] - 1, 3)
        print(f"{name:>10}: init {measured['init_gb']:.2f} GB, after {STEPS} steps {measured['steps_gb']:.2f} GB, "
              f"planner {planned_gb(name, shape):.2f} GB", flush=True)
    print(json.dumps({**figures, "allocator": ALLOCATOR, **load.fields()}))


if __name__ == "__main__":
    main()

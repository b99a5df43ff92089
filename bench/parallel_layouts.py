"""Tokens/s of each parallel layout on this machine's CPU (gloo): proof of function, not of speed.

Every layout is built by the trainer's own ``build_engine`` and trains the same model on the same random-token batches (global batch ``--batch`` rows
of ``--seq`` tokens) with AdamW; every process (the single one too) runs 1 thread, so on a 2-core
machine 4 ranks oversubscribe the cores. Layouts: one process, FSDP2 dp=2, TP=2 (+SP), PP=2
(1F1B), FSDP2×TP 2×2 and PP×FSDP2 2×2. The median step time over the timed steps (after
``--warmup``) gives global tokens/s. TP and PP add communication per layer / per micro-batch and
pay off only when a model does not fit one device; on CPU they are expected to be slower.

    python bench/parallel_layouts.py            # 20 timed steps, cpu-small-like model (6 layers, 384 dims)
    python bench/parallel_layouts.py --quick    # 4 timed steps, 4 layers × 128 dims

The last printed line is one JSON object: {"tokens_per_s": {layout: value}, "relative_to_single": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _load import LoadWatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmray.model import llama  # noqa: E402
from llmray.model.config import preset  # noqa: E402
from llmray.parallel import ParallelConfig, build_engine  # noqa: E402
from llmray.parallel.pipeline import PipelineScheduleConfig  # noqa: E402
from llmray.train.objectives import token_cross_entropy  # noqa: E402
from llmray.train.trainer import OptimizerConfig, optimizer_factory  # noqa: E402

LAYOUTS = {  # name: (world size, parallel config): built by the trainer's own build_engine
    "single": (1, ParallelConfig(strategy="none")),
    "fsdp2_dp2": (2, ParallelConfig()),
    "tp2": (2, ParallelConfig(tp=2)),
    "tp2_sp": (2, ParallelConfig(tp=2, sequence_parallel=True)),
    "pp2_1f1b": (2, ParallelConfig(pp=2)),
    "fsdp2_tp_2x2": (4, ParallelConfig(tp=2)),
    "pp_fsdp2_2x2": (4, ParallelConfig(pp=2)),
}


def model_config(quick: bool):
    if quick:
        return preset("tiny", vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=384,
                      max_seq_len=256, tie_embeddings=False)
    return preset("cpu-small", tie_embeddings=False)


def summed_loss(logits, targets):
    return token_cross_entropy(logits, targets).sum()


def run_layout(rank: int, world: int, port: int, name: str, args, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # every process 1 thread (same for the single-process peer)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _, parallel = LAYOUTS[name]
    dims = parallel.dims(world)
    coords = dims.coordinates(rank)
    rows = args.batch // dims.dp
    parallel.pipeline = PipelineScheduleConfig(schedule="1f1b", microbatches=rows)
    torch.manual_seed(0)
    model = llama.build(model_config(args.quick))
    engine = build_engine(model, optimizer_factory(OptimizerConfig(lr=1e-4), torch.device("cpu")), parallel,
                          world_size=world, param_dtype=None, device=torch.device("cpu"),
                          pipeline_loss=summed_loss)
    generator = torch.Generator().manual_seed(1)
    times = []
    for step in range(args.warmup + args.steps):
        batch = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq + 1), generator=generator)
        mine = batch[coords["dp"] * rows:(coords["dp"] + 1) * rows]
        scale = dims.dp / batch[:, 1:].numel()
        dist.barrier()
        start = time.perf_counter()
        if dims.pp_enabled:
            engine.forward_backward(mine[:, :-1], mine[:, 1:], scale)
        else:
            engine.backward(summed_loss(engine.model(mine[:, :-1]), mine[:, 1:]) * scale, last_micro_batch=True)
        engine.clip_grad_norm(1.0)
        engine.step()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, 4 timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="global batch rows")
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    load = LoadWatch(os.cpu_count() or 1)
    args.steps = args.steps or (4 if args.quick else 20)
    if args.quick:
        args.seq = min(args.seq, 128)
    tokens_per_step = args.batch * args.seq
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (world, _) in LAYOUTS.items():
            mp.start_processes(run_layout, args=(world, free_port(), name, args, Path(tmp)), nprocs=world,
                               start_method="spawn")
            median = statistics.median(json.loads((Path(tmp) / f"{name}.json").read_text()))
            results[name] = round(tokens_per_step / median, 1)
            print(f"{name:>14}: {world} ranks, median step {median * 1000:.0f} ms, {results[name]:.0f} tokens/s",
                  flush=True)
    single = results["single"]
    print(json.dumps({"tokens_per_s": results,
                      "relative_to_single": {k: round(v / single, 3) for k, v in results.items()},
                      "model": "quick 4x128" if args.quick else "cpu-small (untied)", "seq": args.seq,
                      "global_batch": args.batch, **load.fields()}))


if __name__ == "__main__":
    main()

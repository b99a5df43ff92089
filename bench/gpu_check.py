"""The one-command GPU check: the 1b preset's throughput, MFU and memory, and FSDP2 equivalence across GPU counts.

    bash bench/gpu_check.sh [--quick] [--steps 20]

On whatever CUDA GPUs are visible (one process per GPU, NCCL):

* **1b**: 20 steps (``--quick``: 10) of the ``1b`` preset (Llama-3.2-1B shape), built on ``meta``
  and initialized per FSDP2 shard, ``precision: auto`` (bf16 where supported), activation
  checkpointing, 4 rows × 2,048 tokens per GPU of random tokens; the median step's tokens/s, MFU
  against the datasheet bf16 peak (``llmray.train.metrics.GPU_BF16_PEAKS``), the peak CUDA memory
  of rank 0, and whether the process group runs NCCL and the compute dtype is bf16;
* **equivalence** (2 or more GPUs): 5 steps of a small model on one GPU and FSDP2 on two, same
  global batch, bf16: the largest relative difference of the per-step losses (bf16 rounding
  differs with the reduction order; a wrong gradient shows as percent-level gaps);
* **ZeRO-3**: the same 5 steps under DeepSpeed ZeRO-3 on up to two GPUs against one GPU, which
  exercises llmray's CUDA path for ZeRO-3's gradient partitions (made on the compute stream,
  :mod:`llmray.parallel.zero3_memory`), with rank 0's peak reserved CUDA memory.

Without CUDA it prints ``{"cuda": false, ...}`` and exits 0, claiming nothing. Last line: one JSON
object with ``tokens_per_s``, ``mfu``, ``peak_memory_gb``, ``nccl``, ``bf16``, ``loss_max_rel_diff``,
``zero3_loss_max_rel_diff``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import LoadWatch  # noqa: E402
from _random_tokens import RandomTokens  # noqa: E402

from llmray.model import llama  # noqa: E402
from llmray.model.config import preset  # noqa: E402
from llmray.parallel import ParallelConfig  # noqa: E402
from llmray.train.objectives import CausalLM  # noqa: E402
from llmray.train.schedule import ScheduleConfig  # noqa: E402
from llmray.train.trainer import OptimizerConfig, TrainConfig, Trainer  # noqa: E402

SEQ = 2048
ROWS_PER_GPU = 4
SMALL = dict(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=1536, max_seq_len=512)


def train(shape: dict, steps: int, rows: int, seq: int, checkpointing: bool, zero3: bool = False) -> dict:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    cfg = preset(shape.pop("preset", "tiny"), **shape)
    if zero3:
        parallel = ParallelConfig(strategy="deepspeed", zero_stage=3, activation_checkpointing=checkpointing)
    elif world > 1:
        parallel = ParallelConfig(activation_checkpointing=checkpointing)
    else:
        parallel = ParallelConfig(strategy="none", activation_checkpointing=checkpointing)
    train_cfg = TrainConfig(steps=steps, precision="auto", optimizer=OptimizerConfig(lr=3e-4),
                            schedule=ScheduleConfig(warmup_steps=2), log_every=1000)
    trainer = Trainer(train_cfg, llama.build(cfg, "meta"), CausalLM(), RandomTokens(cfg.vocab_size, rows, seq, rank, world),
                      parallel=parallel, flops_per_token=cfg.flops_per_token(seq), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    result = trainer.fit()
    step_s = statistics.median(r.seconds for r in result.records[2:]) if steps > 3 else result.records[-1].seconds
    return {"losses": [result.losses[s] for s in range(1, steps + 1)], "step_s": step_s,
            "tokens_per_s": rows * seq / step_s, "mfu": result.last_metrics.get("mfu"),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2 ** 30,
            "nccl": dist.get_backend() == "nccl", "bf16": trainer.dtype is torch.bfloat16,
            "gpu": torch.cuda.get_device_name(device), "world": world}


def _rank_main(local_rank: int, world: int, port: int, task: dict, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    dist.init_process_group("nccl", rank=local_rank, world_size=world,
                            device_id=torch.device("cuda", local_rank))
    try:
        result = train(**task)
        if local_rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def on_gpus(world: int, task: dict) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_rank_main, args=(world, port, task, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def max_rel_diff(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps of the 1b preset (under 5 minutes)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    load = LoadWatch(os.cpu_count() or 1)
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "skipped": "no CUDA device visible; nothing measured", **load.fields()}))
        return
    gpus = torch.cuda.device_count()
    steps = args.steps or (10 if args.quick else 20)
    big = on_gpus(gpus, {"shape": {"preset": "1b"}, "steps": steps, "rows": ROWS_PER_GPU * gpus, "seq": SEQ,
                         "checkpointing": True})
    figures = {"cuda": True, "gpus": gpus, "gpu": big["gpu"], "model": "1b", "steps": steps,
               "tokens_per_s": round(big["tokens_per_s"], 1), "tokens_per_s_per_gpu": round(big["tokens_per_s"] / gpus, 1),
               "mfu": round(big["mfu"], 4) if big["mfu"] is not None else None,
               "peak_memory_gb": round(big["peak_memory_gb"], 2), "nccl": big["nccl"], "bf16": big["bf16"]}
    task = {"shape": dict(SMALL), "steps": 5, "rows": 8, "seq": 512, "checkpointing": False}
    one = on_gpus(1, task)
    if gpus >= 2:
        two = on_gpus(2, task)
        figures["loss_max_rel_diff"] = max_rel_diff(two["losses"], one["losses"])
        figures["losses_1gpu"], figures["losses_2gpu"] = one["losses"], two["losses"]
    zero3 = on_gpus(min(gpus, 2), {**task, "zero3": True})
    figures["zero3_loss_max_rel_diff"] = max_rel_diff(zero3["losses"], one["losses"])
    figures["zero3_gpus"], figures["zero3_peak_reserved_gb"] = zero3["world"], round(zero3["peak_reserved_gb"], 2)
    print(f"{gpus}x {big['gpu']}: 1b at {figures['tokens_per_s']} tokens/s, MFU {figures['mfu']}, "
          f"peak {figures['peak_memory_gb']} GB, nccl {big['nccl']}, bf16 {big['bf16']}")
    print(json.dumps({**figures, **load.fields()}))


if __name__ == "__main__":
    main()

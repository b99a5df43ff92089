"""MFU of the training core on this machine: GEMM peak vs the trainer's achieved FLOP/s on `cpu-small`.

    python bench/mfu.py [--quick] [--threads 2] [--precision auto|fp32|bf16]

Peak: the best of repeated 2048×2048 GEMMs (``llmray.train.metrics.measure_peak_flops``) in the
dtype the trainer computes in (``--precision``, default ``auto``: bf16 on CPUs where that is
faster), measured in this process with the same thread count as training. Achieved: the ``cpu-small``
model (seq 256, micro-batch 8, AdamW, grad clip) trained by ``llmray.train.trainer.Trainer`` in
one process; FLOPs per token from ``ModelConfig.flops_per_token`` (PaLM 6N + 12·L·H·Q·T);
median step time after warm-up. Three rounds (peak, then training), the round with the median MFU
reported. Last line: JSON with ``peak_gflops``, ``achieved_gflops``, ``mfu``, ``mfu_rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _byte_shards  # noqa: E402
from _load import LoadWatch  # noqa: E402

from llmray.model import llama  # noqa: E402
from llmray.model.config import preset  # noqa: E402
from llmray.tokens.loader import TokenLoader  # noqa: E402
from llmray.train.metrics import measure_peak_flops  # noqa: E402
from llmray.train.objectives import CausalLM  # noqa: E402
from llmray.train.schedule import ScheduleConfig  # noqa: E402
from llmray.train.trainer import TrainConfig, Trainer  # noqa: E402


def measure_round(cfg, args: argparse.Namespace, steps: int, warmup: int) -> dict:
    """One round: ``steps`` trainer steps at ``--precision``, MFU from the median step after ``warmup``
    against the GEMM peak measured in the dtype the trainer computes in."""
    with tempfile.TemporaryDirectory() as tmp:
        shards = _byte_shards.write(Path(tmp) / "shards", max_bytes=3_000_000)
        torch.manual_seed(0)
        data = TokenLoader(shards, seq_len=args.seq_len, batch_size=args.batch, seed=0)
        train = TrainConfig(steps=steps, schedule=ScheduleConfig(warmup_steps=2), log_every=1000,
                            precision=args.precision)
        trainer = Trainer(train, llama.build(cfg), CausalLM(), data, flops_per_token=cfg.flops_per_token(args.seq_len))
        dtype = trainer.dtype or torch.float32
        peak = measure_peak_flops("cpu", dtype, seconds=3.0)
        trainer.peak_flops = peak
        result = trainer.fit()
    step_s = statistics.median(r.seconds for r in result.records[warmup:])
    tokens_per_s = args.batch * args.seq_len / step_s
    achieved = cfg.flops_per_token(args.seq_len) * tokens_per_s
    return {"model": "cpu-small", "params": cfg.num_params(), "threads": args.threads, "dtype": str(dtype),
            "seq_len": args.seq_len, "batch": args.batch, "steps_timed": steps - warmup,
            "median_step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
            "flops_per_token": cfg.flops_per_token(args.seq_len),
            "peak_gflops": round(peak / 1e9, 2), "achieved_gflops": round(achieved / 1e9, 2),
            "mfu": round(achieved / peak, 4), "final_loss": round(result.losses[steps], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (under 5 minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="train.precision; the peak is measured in the dtype it resolves to")
    parser.add_argument("--rounds", type=int, default=3, help="peak + training rounds; the median MFU's round is reported")
    args = parser.parse_args()
    load = LoadWatch(args.threads)
    torch.set_num_threads(args.threads)
    steps, warmup = (8, 3) if args.quick else (30, 5)

    cfg = preset("cpu-small")
    rounds = [measure_round(cfg, args, steps, warmup) for _ in range(args.rounds)]
    median_mfu = statistics.median(r["mfu"] for r in rounds)
    figures = min(rounds, key=lambda r: abs(r["mfu"] - median_mfu))
    figures = {**figures, "rounds": args.rounds, "mfu_rounds": [r["mfu"] for r in rounds]}
    print(f"peak {figures['peak_gflops']} GFLOP/s; trainer {figures['achieved_gflops']} GFLOP/s "
          f"({figures['tokens_per_s']} tok/s); MFU {figures['mfu']:.1%}")
    print(json.dumps({**figures, **load.fields()}))


if __name__ == "__main__":
    main()

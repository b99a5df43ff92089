"""bf16 vs fp32 pretraining on this CPU: tokens/s of `cpu-small` through the training core, and the loss gap.

    python bench/precision.py [--quick] [--threads 2]

The same run twice, differing only in ``train.precision``: the ``cpu-small`` model (seq 256,
micro-batch 8, AdamW, grad clip, warmup then cosine), the real TokenLoader on byte-level shards
of this machine's Python sources, the same seed, steps and batches, in one process with
``--threads`` torch threads. fp32 is the peer (what ``auto`` picks where bf16 is not faster);
bf16 is autocast compute with fp32 master weights and optimizer state
(:mod:`llmray.train.precision`). Tokens/s comes from the median step time after ``WARMUP``
steps; the loss gap is the relative difference of the validation loss (the same held-out
batches) after the last step, and of the mean training loss over the last 10 steps. Full run:
200 steps each; ``--quick``: 40. ``auto_picks`` says what ``precision: auto`` chooses here.
Last line: JSON with ``fp32_tokens_per_s``, ``bf16_tokens_per_s``, ``speedup``, ``loss_gap``.
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
from llmray.parallel import fsdp  # noqa: E402
from llmray.tokens.loader import TokenLoader  # noqa: E402
from llmray.train import precision  # noqa: E402
from llmray.train.objectives import CausalLM  # noqa: E402
from llmray.train.schedule import ScheduleConfig  # noqa: E402
from llmray.train.trainer import OptimizerConfig, TrainConfig, Trainer  # noqa: E402

WARMUP = 5
LAST = 10


def train(shards: Path, cfg, args: argparse.Namespace, precision_: str, steps: int) -> dict:
    torch.manual_seed(0)
    data = TokenLoader(shards, seq_len=args.seq_len, batch_size=args.batch, seed=0)

    def val():
        return TokenLoader(shards, split="val", seq_len=args.seq_len, batch_size=args.batch, shuffle=False)
    train_cfg = TrainConfig(steps=steps, precision=precision_, optimizer=OptimizerConfig(lr=1e-3),
                            schedule=ScheduleConfig(warmup_steps=10), log_every=1000, eval_batches=8,
                            peak_flops=1e12)
    model = llama.build(cfg)
    if args.compile:
        fsdp.apply_compile(model)
    result = Trainer(train_cfg, model, CausalLM(), data, val_data=val).fit()
    step_s = statistics.median(r.seconds for r in result.records[WARMUP:])
    last = [result.losses[s] for s in range(steps - LAST + 1, steps + 1)]
    return {"tokens_per_s": round(args.batch * args.seq_len / step_s, 1), "median_step_s": round(step_s, 4),
            "val_loss": round(result.evals[-1]["val_loss"], 4), "last_train_loss": round(statistics.mean(last), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 steps per precision (under 5 minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (both precisions)")
    args = parser.parse_args()
    load = LoadWatch(args.threads)
    torch.set_num_threads(args.threads)
    steps = 40 if args.quick else 200
    cfg = preset("cpu-small")
    with tempfile.TemporaryDirectory() as tmp:
        shards = _byte_shards.write(Path(tmp) / "shards", max_bytes=6_000_000)
        runs = {name: train(shards, cfg, args, name, steps) for name in ("fp32", "bf16")}
        auto = precision.compute_dtype("auto", torch.device("cpu"), cfg.dim, cfg.ffn_hidden_dim)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    figures = {
        "model": "cpu-small", "steps": steps, "threads": args.threads, "seq_len": args.seq_len, "batch": args.batch,
        "fp32_tokens_per_s": fp32["tokens_per_s"], "bf16_tokens_per_s": bf16["tokens_per_s"],
        "speedup": round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 3),
        "loss_gap": round(abs(bf16["val_loss"] - fp32["val_loss"]) / fp32["val_loss"], 4),
        "train_loss_gap": round(abs(bf16["last_train_loss"] - fp32["last_train_loss"]) / fp32["last_train_loss"], 4),
        "runs": runs, "auto_picks": "bf16" if auto is torch.bfloat16 else "fp32",
        "cpu_bf16_gemm_speedup": round(precision.cpu_bf16_speedup(cfg.dim, cfg.ffn_hidden_dim), 3),
    }
    print(f"fp32 {fp32['tokens_per_s']} tok/s, bf16 {bf16['tokens_per_s']} tok/s: {figures['speedup']}x; "
          f"val loss {fp32['val_loss']} vs {bf16['val_loss']} (gap {figures['loss_gap']:.2%})")
    print(json.dumps({**figures, **load.fields()}))


if __name__ == "__main__":
    main()

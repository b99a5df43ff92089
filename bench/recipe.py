"""The training recipe (Muon + warmup-stable-decay to zero) vs the baseline (AdamW + cosine) at equal compute.

    python bench/recipe.py            # 3 seeds, 300 steps each
    python bench/recipe.py --quick    # 1 seed, 150 steps (under 5 minutes idle)
    python bench/recipe.py --qk-norm  # the recipe arm with QK-norm (does it help? compare recipe_bpb)

Both arms train a ``depth: 3`` model of the one-knob family (dim 192, 3 heads, 1.4M parameters,
untied head, RoPE, a vocabulary of 257 byte ids) on the same token shards in the same order
(byte-level shards of thirteen Project Gutenberg books from ``../shared/data/books_gutenberg``;
every 20th 4 KiB chunk of each book is held out), with the same seeds, batch (8 × 256 tokens),
warm-up (20 steps), gradient clipping and in-process trainer:

* **baseline** (GPT-2 style, ``configs/train/baseline-gpt2.yaml`` at this size): GELU MLP of
  4·dim and LayerNorm with bias (the same parameter count as SwiGLU + RMSNorm, plus the norm
  biases), AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1 on matrices) everywhere, cosine to
  10% of the peak;
* **recipe**: SwiGLU + RMSNorm, Muon (lr 0.02, momentum 0.95, Nesterov, 5 Newton–Schulz steps)
  on the blocks' matrices and AdamW (as the baseline) on embeddings, head and norms,
  warmup-stable-decay with the last 40% decaying linearly to zero.

Held-out bits per byte (exact: byte tokens, BOS counts no bytes) is measured every 25 steps on
the same 16 validation windows. ``tokens_to_baseline_ratio`` is the fraction of the run's tokens
the recipe needed to reach the baseline's final bpb (linear between evaluations; null when it did
not). The last line printed is one JSON object: ``baseline_bpb``, ``recipe_bpb`` (means over
seeds, with per-seed values), ``bpb_gain`` (1 - recipe/baseline), ``tokens_to_baseline_ratio``,
and ``_load.LoadWatch``'s load averages and ``idle``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import _byte_shards
from _load import LoadWatch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmray.model import llama  # noqa: E402
from llmray.model.config import ModelConfig  # noqa: E402
from llmray.parallel import ParallelConfig  # noqa: E402
from llmray.tokens.loader import TokenLoader  # noqa: E402
from llmray.train.muon import MuonConfig  # noqa: E402
from llmray.train.objectives import CausalLM  # noqa: E402
from llmray.train.schedule import ScheduleConfig  # noqa: E402
from llmray.train.trainer import OptimizerConfig, TrainConfig, Trainer  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402

THREADS = 2
SEQ, BATCH, WARMUP, EVAL_EVERY, EVAL_BATCHES = 256, 8, 20, 25, 16
MODEL = ModelConfig(vocab_size=257, depth=3, max_seq_len=SEQ, tie_embeddings=False)
# GPT-2's blocks at the same parameter count: a 4·dim GELU MLP has the weights of the 8/3·dim SwiGLU
GPT2_STYLE = dataclasses.replace(MODEL, mlp="gelu", norm="layernorm", ffn_hidden_dim=4 * MODEL.dim)
ARMS = {
    "baseline": (GPT2_STYLE, OptimizerConfig(kind="adamw", lr=2e-3),
                 ScheduleConfig(kind="cosine", warmup_steps=WARMUP, min_lr_ratio=0.1)),
    "recipe": (MODEL, OptimizerConfig(kind="muon", lr=2e-3, muon=MuonConfig(lr=0.02)),
               ScheduleConfig(kind="wsd", warmup_steps=WARMUP, min_lr_ratio=0.0, decay_fraction=0.4)),
}
CHUNK, HOLD_OUT_EVERY = 4096, 20


def write_book_shards(directory: Path) -> Path:
    """Byte shards of the Gutenberg books in CHUNK-byte documents, every HOLD_OUT_EVERY-th held out."""
    books = sorted((SHARED_DATA / "books_gutenberg").glob("*.txt.gz"))
    if not books:
        raise SystemExit(f"no books under {SHARED_DATA / 'books_gutenberg'} (set LLMRAY_SHARED_DATA)")

    def chunks():
        for book in books:
            data = gzip.decompress(book.read_bytes())
            for index, start in enumerate(range(0, len(data), CHUNK)):
                split = "val" if index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 else "train"
                yield data[start:start + CHUNK], book.name, split
    return _byte_shards.write_documents(directory, chunks(), 2_000_000)


def train_arm(shards: Path, arm: str, seed: int, steps: int) -> list[dict]:
    """The arm's held-out bpb curve: [{"step", "val_bpb", ...}] every EVAL_EVERY steps."""
    shape, optimizer, schedule = ARMS[arm]
    cfg = TrainConfig(steps=steps, optimizer=optimizer, schedule=schedule, grad_clip=1.0, log_every=EVAL_EVERY,
                      eval_every=EVAL_EVERY, eval_batches=EVAL_BATCHES, seed=seed, peak_flops=1e11)
    torch.manual_seed(seed)
    model = llama.build(shape)
    data = TokenLoader(shards, seq_len=SEQ, batch_size=BATCH, seed=seed)

    def validation():
        return TokenLoader(shards, split="val", seq_len=SEQ, batch_size=BATCH, shuffle=False)
    trainer = Trainer(cfg, model, CausalLM(), data, parallel=ParallelConfig(strategy="none"), val_data=validation,
                      token_bytes=_byte_shards.token_bytes(), flops_per_token=shape.flops_per_token(SEQ))
    return trainer.fit().evals


def steps_to_reach(curve: list[dict], target: float) -> float | None:
    """First (interpolated) step at which the curve's bpb is at or below ``target``."""
    previous = None
    for point in curve:
        if point["val_bpb"] <= target:
            if previous is None:
                return float(point["step"])
            span = previous["val_bpb"] - point["val_bpb"]
            fraction = (previous["val_bpb"] - target) / span if span > 0 else 1.0
            return previous["step"] + fraction * (point["step"] - previous["step"])
        previous = point
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 150 steps")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--qk-norm", action="store_true", help="the recipe arm with QK-norm (to measure it)")
    args = parser.parse_args()
    if args.qk_norm:
        shape, optimizer, schedule = ARMS["recipe"]
        ARMS["recipe"] = (dataclasses.replace(shape, qk_norm=True), optimizer, schedule)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    steps = args.steps or (150 if args.quick else 300)
    load = LoadWatch(THREADS)
    torch.set_num_threads(THREADS)
    print(f"parameters: baseline {GPT2_STYLE.num_params():,}, recipe {MODEL.num_params():,}; {steps} steps of {BATCH * SEQ} tokens; "
          f"seeds {seeds}", flush=True)
    finals: dict[str, list[float]] = {arm: [] for arm in ARMS}
    ratios, seconds = [], {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="recipe-bench-") as tmp:
        shards = write_book_shards(Path(tmp) / "shards")
        for seed in seeds:
            curves = {}
            for arm in ARMS:
                start = time.perf_counter()
                curves[arm] = train_arm(shards, arm, seed, steps)
                seconds[arm].append(round(time.perf_counter() - start, 1))
                finals[arm].append(curves[arm][-1]["val_bpb"])
                print(f"seed {seed} {arm}: " + ", ".join(f"{p['step']}:{p['val_bpb']:.3f}" for p in curves[arm])
                      + f" ({seconds[arm][-1]} s)", flush=True)
            reached = steps_to_reach(curves["recipe"], finals["baseline"][-1])
            ratios.append(None if reached is None else reached / steps)
    baseline, recipe = statistics.mean(finals["baseline"]), statistics.mean(finals["recipe"])
    reached = [r for r in ratios if r is not None]
    print(json.dumps({
        "baseline_bpb": round(baseline, 4), "recipe_bpb": round(recipe, 4), "bpb_gain": round(1 - recipe / baseline, 4),
        "tokens_to_baseline_ratio": round(statistics.mean(reached), 3) if len(reached) == len(ratios) else None,
        "per_seed": {"baseline_bpb": [round(v, 4) for v in finals["baseline"]],
                     "recipe_bpb": [round(v, 4) for v in finals["recipe"]],
                     "tokens_to_baseline_ratio": [None if r is None else round(r, 3) for r in ratios]},
        "spread": {arm: round(max(v) - min(v), 4) for arm, v in finals.items()},
        "steps": steps, "tokens": steps * BATCH * SEQ, "recipe_qk_norm": args.qk_norm,
        "parameters": {arm: shape.num_params() for arm, (shape, _, _) in ARMS.items()}, "seeds": len(seeds),
        "threads": THREADS, "seconds": seconds, **load.fields()}))


if __name__ == "__main__":
    main()

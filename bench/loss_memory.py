"""Peak memory of the LM loss at Llama 3's vocabulary: the fused, chunked head + cross-entropy vs full logits.

    python bench/loss_memory.py [--quick] [--threads 2]

One rank's loss on ``--tokens`` tokens (8,192; ``--quick``: 2,048) with a 128,256-token
vocabulary and hidden width ``--dim`` (512: the logits' size does not depend on the width, and a
4,096-wide head would take ~10 minutes of CPU GEMMs), forward and backward, fp32:

* **full**: ``cross_entropy_sum(hidden @ weight.T, targets)``, the path every trainer without a
  fused loss takes (fp32 logits, their log-softmax and its gradient: (tokens × vocab) each);
* **chunked**: ``llmray.model.linear_cross_entropy`` (256 tokens at a time).

Each runs in its own process; its figure is the peak resident memory during the loss minus the
resident memory just before it (hidden states, head weight and targets already allocated; both
produce the same gradients). Last line: JSON with ``full_mb``, ``chunked_mb``, ``ratio`` (target
>= 3) and the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import LoadWatch  # noqa: E402

from llmray.process_memory import peak_resident_mb, resident_mb  # noqa: E402

VOCAB = 128_256


def run_variant(args: argparse.Namespace) -> dict:
    """In the child process: allocate the inputs, then run one loss forward + backward."""
    import torch

    from llmray.model import linear_cross_entropy as lce

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, generator=gen).requires_grad_()
    weight = (torch.randn(VOCAB, args.dim, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (args.tokens,), generator=gen)
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)  # the gradients both make
    before = resident_mb()
    start = time.perf_counter()
    if args.variant == "full":
        loss = lce.cross_entropy_sum(hidden @ weight.T, targets)
    else:
        loss = lce.linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_resident_mb()
    return {"peak_mb": round(peak - before, 1), "seconds": round(seconds, 2), "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,048 tokens (under 5 minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tokens = args.tokens or (2048 if args.quick else 8192)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    load = LoadWatch(args.threads)
    results = {}
    for variant in ("full", "chunked"):
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                                "--dim", str(args.dim), "--threads", str(args.threads)],
                               check=True, capture_output=True, text=True)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    assert abs(full["loss"] - chunked["loss"]) / full["loss"] < 1e-5, results
    figures = {"tokens": args.tokens, "vocab": VOCAB, "dim": args.dim, "full_mb": full["peak_mb"],
               "chunked_mb": chunked["peak_mb"], "ratio": round(full["peak_mb"] / chunked["peak_mb"], 2),
               "full_seconds": full["seconds"], "chunked_seconds": chunked["seconds"],
               "logits_fp32_mb": round(args.tokens * VOCAB * 4 / 2 ** 20, 1)}
    print(f"loss at {args.tokens} tokens x {VOCAB} vocab: full logits {full['peak_mb']} MB, "
          f"chunked {chunked['peak_mb']} MB ({figures['ratio']}x lower)")
    print(json.dumps({**figures, **load.fields()}))


if __name__ == "__main__":
    main()

"""``train.precision`` resolved to the dtype the training core computes in, and the rule behind ``auto``.

Mixed precision here always means: master weights, gradients and optimizer state in fp32; the
forward in bf16 (``torch.autocast``, or FSDP2's ``MixedPrecisionPolicy`` where FSDP2 shards the
model); the loss, its reductions and the gradient all-reduce in fp32. :mod:`llmray.train.trainer`
applies it the same way on every layout.

The ``auto`` rule:

* **CUDA**: bf16 when the GPU supports it (``torch.cuda.is_bf16_supported()``), else fp32.
* **CPU**: bf16 when the model is at least :data:`CPU_MIN_WIDTH` wide *and* a GEMM of the model's
  own MLP shape (2,048 tokens × dim @ dim × ffn_hidden) runs at least :data:`CPU_MIN_SPEEDUP`
  times faster in bf16 than in fp32 on this process's threads. CPUs with AMX or AVX512-BF16
  units pass (measured on an EPYC with AVX512-BF16: 2.2× at width 384, a whole ``cpu-small``
  training step 1.65×); CPUs that emulate bf16 do not. Below width 256 a whole step gains
  nothing (the tiny model: 1.0×) while bf16 rounding would be paid for nothing, so narrow models
  stay fp32 without probing. Under ``torch.distributed`` rank 0's probe result is broadcast, so
  every rank computes in the same dtype however noisy the probe.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist

CPU_MIN_WIDTH = 256
CPU_MIN_SPEEDUP = 1.3
PROBE_TOKENS = 2048
PROBE_SECONDS = 0.1


def compute_dtype(precision: str, device: torch.device, width: int | None = None,
                  hidden: int | None = None) -> torch.dtype | None:
    """The forward's dtype for ``precision`` on ``device`` (None: plain fp32).

    ``width`` / ``hidden``: the model's ``dim`` and MLP width, which ``auto`` probes on CPU.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                             "use precision: fp32 (or auto)")
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu" or width is None or width < CPU_MIN_WIDTH:
        return None
    faster = cpu_bf16_speedup(width, hidden or 4 * width) >= CPU_MIN_SPEEDUP
    return torch.bfloat16 if _rank0_decides(faster) else None


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(width: int, hidden: int) -> float:
    """How many times faster a (tokens × width) @ (width × hidden) GEMM runs in bf16 than fp32 here."""
    return _gemm_rate(width, hidden, torch.bfloat16) / _gemm_rate(width, hidden, torch.float32)


def _gemm_rate(width: int, hidden: int, dtype: torch.dtype) -> float:
    a = torch.randn(PROBE_TOKENS, width).to(dtype)
    b = torch.randn(width, hidden).to(dtype)
    a @ b  # warm-up (oneDNN picks its kernel on the first call)
    best = float("inf")
    deadline = time.perf_counter() + PROBE_SECONDS
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 1.0 / best


def _rank0_decides(choice: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return choice
    flag = torch.tensor([int(choice)])
    dist.broadcast(flag, src=0)
    return bool(flag.item())

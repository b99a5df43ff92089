"""Training metrics: the measured FLOP/s peak, MFU, memory, and where rank 0 writes each step's figures.

* :func:`peak_flops` is the denominator of MFU: a configured value, else the datasheet's dense
  bf16 peak for known GPUs (:data:`GPU_BF16_PEAKS`, the figure MFU is quoted against in the
  literature), else :func:`measure_peak_flops`, which times a square GEMM on the training device
  and dtype (on CPU there is no datasheet to quote; ``bench/mfu.py`` prints both). The measurement
  is kept per process (:func:`measured_peak_flops`): each training start in one process (the
  stages of an in-process pipeline, a test suite) would otherwise spend 0.5-0.7 s timing GEMMs.
* MFU = model FLOPs per token (PaLM's 6N + 12·L·H·Q·T, from ``ModelConfig.flops_per_token``)
  × tokens per second / (peak per worker × workers).
* :class:`MetricsWriter` appends one JSON line per logged step to ``metrics.jsonl`` (the run
  directory's format), mirrors scalars to TensorBoard and prints one console line per logged
  step (:func:`format_progress`); figures written beside a step (validation by a hook, an
  in-training evaluation) print their own line or none, so a step's line appears once.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmray import storage
from llmray.process_memory import peak_resident_mb

EVAL_PREFIX = "eval/"  # in-training evaluation results in metrics.jsonl: eval/<task>/<metric>, eval/core


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so more specific names come first.
GPU_BF16_PEAKS = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),  # and GH200
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM and NVL
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)


def datasheet_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet bf16 peak of ``device`` (None for CPUs, other dtypes and unknown GPUs)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAKS if key in name), None)


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float | None = None) -> float:
    """MFU's denominator per worker: ``configured``, else the datasheet peak, else a measured GEMM."""
    return configured or datasheet_peak_flops(device, dtype) or measured_peak_flops(device, dtype)


_measured_peaks: dict[tuple, float] = {}  # (device, dtype, torch threads) -> FLOP/s, this process's


def measured_peak_flops(device: torch.device, dtype: torch.dtype, again: bool = False) -> float:
    """This process's measured GEMM peak on ``device`` in ``dtype`` at its torch thread count, timed on the
    first call; ``again`` times it anew and keeps the higher figure (a first timing taken while
    other work held the cores is too low)."""
    key = (str(device), dtype, torch.get_num_threads())
    if again or key not in _measured_peaks:
        _measured_peaks[key] = max(_measured_peaks.get(key, 0.0), measure_peak_flops(device, dtype, seconds=0.5))
    return _measured_peaks[key]


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of ``size``×``size`` GEMMs on ``device`` in ``dtype`` (best of repeated timings)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size ** 3
    best = math.inf
    a @ b  # warm-up
    _sync(device)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == math.inf:
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return flops / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA max allocated on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_resident_mb()


def mfu(flops_per_token: int, tokens_per_s: float, peak_flops_per_worker: float, world_size: int) -> float:
    return flops_per_token * tokens_per_s / (peak_flops_per_worker * world_size)


class MetricsWriter:
    """Rank 0's sink: metrics.jsonl lines, TensorBoard scalars and a console line every ``console_every`` steps.

    The console line is written to stderr directly (not ``print``), and Ray Train workers run with
    Ray's print patch off (:mod:`llmray.train.ray_train`), so a line is never echoed twice.
    On an object store, where nothing can be appended to, both are kept in a node-local folder
    (continuing the stored ``metrics.jsonl`` of an earlier attempt) and uploaded whole at most
    every ``sync_seconds``, at every ``durable`` write (the trainer's checkpoint steps) and at
    ``close``; lines after the last upload are lost with the worker, as the steps they describe
    are: the run resumes from a checkpoint before them.
    """

    def __init__(self, jsonl: str | Path | None, tensorboard_dir: str | Path | None, console_every: int = 10,
                 sync_seconds: float = 30.0):
        self.console_every, self.sync_seconds = console_every, sync_seconds
        self.remote = {"jsonl": jsonl, "tensorboard": tensorboard_dir} if jsonl and storage.is_remote(jsonl) else None
        self._scratch = None
        if self.remote is not None:
            self._scratch = Path(tempfile.mkdtemp(prefix="llmray-metrics-"))
            jsonl, tensorboard_dir = self._scratch / "metrics.jsonl", self._scratch / "tensorboard"
            if storage.exists(self.remote["jsonl"]):
                storage.download(self.remote["jsonl"], jsonl)
        self.jsonl = Path(jsonl) if jsonl else None
        self._synced = time.monotonic()
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, step: int, metrics: dict, console: bool = True, durable: bool = False) -> None:
        """Record ``metrics`` of ``step``; ``console=False`` for figures that are not the step's own;
        ``durable``: on an object store, upload now."""
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(self.jsonl, "a", encoding="utf-8") as handle:  # one write per line: never half a line
                handle.write(json.dumps({"time": time.time(), "step": step, **metrics}, default=float) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
        if console and self.console_every and (step % self.console_every == 0 or "val_loss" in metrics):
            self.say(format_progress(step, metrics))
        if self.remote is not None and (durable or time.monotonic() - self._synced >= self.sync_seconds):
            self._upload()

    def _upload(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            storage.upload_folder(self._scratch / "tensorboard", self.remote["tensorboard"])
        if self.jsonl.is_file():
            storage.write_bytes(self.remote["jsonl"], self.jsonl.read_bytes())
        self._synced = time.monotonic()

    @staticmethod
    def say(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.remote is not None:
            self._upload()
            shutil.rmtree(self._scratch, ignore_errors=True)


def format_evaluation(step: int, results: dict) -> str:
    """``step 20 eval | core 0.0123 | arc_easy/acc 0.2600 | ...``: the CORE aggregate first."""
    scores = {key.removeprefix(EVAL_PREFIX): value for key, value in results.items() if key.startswith(EVAL_PREFIX)}
    return " | ".join([f"step {step} eval"] + [f"{key} {scores[key]:.4f}"
                                               for key in sorted(scores, key=lambda key: (key != "core", key))])


def format_progress(step: int, m: dict) -> str:
    parts = [f"step {step}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("val_bpb", "bpb {:.3f}"),
                     ("lr", "lr {:.2e}"), ("grad_norm", "|g| {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("mfu", "mfu {:.1%}"), ("step_time_s", "{:.3f} s/step"), ("memory_mb", "{:,.0f} MiB")):
        if key in m:
            parts.append(fmt.format(m[key]))
    return " | ".join(parts)

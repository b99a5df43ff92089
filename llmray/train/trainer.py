"""The one training core: pretraining, SFT, DPO and the proxy are this loop with another objective and data.

Design choices (stages build it through :mod:`llmray.train.launch`):

* Everything that varies is a parameter: the ``objective`` (:mod:`~llmray.train.objectives`),
  ``data`` (any micro-batch iterator with ``state_dict``), the ``parallel`` layout behind one
  engine API (:mod:`llmray.parallel`), the checkpoint ``store`` and per-step ``hooks``.
* A step's weight (target tokens, pairs) is all-reduced before the forward passes and each
  micro-batch's summed loss is scaled by ``world_size / weight``, so the gradient is the mean
  over the global batch however it is split into micro-batches and ranks (the equivalence tests
  rely on this).
* The :class:`~llmray.train.guards.StabilityGuard` decides per step: step, skip (weights and
  optimizer untouched) or roll back to the last checkpoint (the data position is kept, so the
  offending batches are passed over); the LR schedule counts skipped steps.
* A checkpoint holds the step, schedule position, data position, RNG and guard history, so a
  resumed run computes bit-identical losses on CPU.
* Precision (:mod:`~llmray.train.precision`): fp32 master weights, gradients and optimizer state;
  bf16 compute where ``train.precision`` resolves to it, by autocast on every layout that does
  not cast parameters itself (:func:`~llmray.parallel.casts_parameters`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
import torch.distributed as dist
from torch import nn

from llmray.config import param
from llmray.model import param_init
from llmray.parallel import ParallelConfig, build_engine, casts_parameters
from llmray.parallel.pipeline import PipelineEngine
from llmray.train import checkpoint as ckpt
from llmray.train import metrics as metrics_lib
from llmray.train import muon as muon_lib
from llmray.train import precision
from llmray.train.guards import GuardConfig, StabilityGuard, Verdict
from llmray.train.objectives import IGNORE_INDEX, Objective, bits_per_byte, token_cross_entropy
from llmray.train.schedule import LRScheduler, ScheduleConfig

log = logging.getLogger("llmray.train")


@dataclass
class OptimizerConfig:
    """AdamW with decoupled weight decay on matrices only; or Muon on the hidden matrices and AdamW on the rest."""

    kind: Literal["adamw", "muon"] = param("adamw", doc="adamw: AdamW everywhere; muon: Muon on the 2-D "
                                                        "matrices named in muon.params, AdamW on the rest")
    lr: float = param(3e-4, doc="peak learning rate (of the AdamW groups)", min=0.0)
    lr_width_reference: int | None = param(
        None, doc="scale the AdamW groups' lr by sqrt(lr_width_reference / model.dim), so an lr tuned at one "
                  "width carries across the depth family (Muon's lr needs no such scaling: its updates are "
                  "orthogonalized and shape-scaled); null = lr as given", min=1)
    beta1: float = param(0.9, doc="AdamW beta1", min=0.0, max=1.0)
    beta2: float = param(0.95, doc="AdamW beta2", min=0.0, max=1.0)
    eps: float = param(1e-8, doc="AdamW epsilon", min=0.0)
    weight_decay: float = param(0.1, doc="decoupled weight decay of the decayed group", min=0.0)
    no_decay: list[str] = param(default_factory=lambda: ["norm", "tok_embeddings", "bias"],
                                doc="parameters whose name contains any of these get no weight decay")
    fused: bool | None = param(None, doc="fused AdamW kernel; null = fused on CPU and CUDA (on CPU ~5x faster than "
                                         "foreach: 4 vs 22 ms a step for cpu-small), foreach elsewhere; kind=adamw only")
    muon: muon_lib.MuonConfig = param(default_factory=muon_lib.MuonConfig, doc="Muon settings (kind=muon)")


@dataclass
class TrainConfig:
    """The training loop's own settings (model, data and parallelism are configured beside it)."""

    steps: int = param(1000, doc="optimizer steps to train for", min=1)
    grad_accum: int = param(1, doc="micro-batches per optimizer step on each worker", min=1)
    grad_clip: float = param(1.0, doc="clip the global gradient L2 norm to this (0 = no clipping)", min=0.0)
    optimizer: OptimizerConfig = param(default_factory=OptimizerConfig, doc="AdamW / Muon settings")
    schedule: ScheduleConfig = param(default_factory=ScheduleConfig, doc="learning-rate schedule")
    guards: GuardConfig = param(default_factory=GuardConfig, doc="non-finite / spike handling")
    precision: Literal["auto", "fp32", "bf16"] = param(
        "auto", doc="bf16: bf16 compute, fp32 master weights, optimizer state and reductions; fp32; auto: bf16 "
                    "on GPUs that support it and on CPUs where the model is >= 256 wide and a bf16 GEMM of its "
                    "shape is >= 1.3x faster than fp32 (llmray.train.precision), else fp32")
    log_every: int = param(10, doc="write and report metrics every this many steps", min=1)
    eval_every: int = param(0, doc="validation every this many steps (0 = only at the end)", min=0)
    eval_batches: int = param(8, doc="validation micro-batches per worker", min=1)
    checkpoint_every: int = param(0, doc="checkpoint every this many steps (0 = only at the end)", min=0)
    seed: int = param(0, doc="seed of the weight init and the torch RNG", min=0)
    peak_flops: float | None = param(None, doc="peak FLOP/s of one worker for MFU; null = measure "
                                                "a GEMM on the device at start", min=1.0)


@dataclass
class StepRecord:
    step: int
    loss: float
    grad_norm: float | None
    lr: float
    verdict: str
    tokens: int
    seconds: float


@dataclass
class TrainResult:
    steps: int
    records: list[StepRecord] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    guard_counts: dict = field(default_factory=dict)
    resumed_from: str | None = None
    last_metrics: dict = field(default_factory=dict)  # of the last step trained in this process

    @property
    def losses(self) -> dict[int, float]:
        """Loss of every step computed in this process (the last computation wins after a rollback)."""
        return {r.step: r.loss for r in self.records}


def device_for_worker(ray_train_worker: bool = False) -> torch.device:
    """The device this worker trains on: Ray Train's assignment for its workers (the GPU Ray gave
    this worker, whatever its rank), the first GPU in one process, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if ray_train_worker:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cuda", 0)


def adamw_lr(model: nn.Module, cfg: OptimizerConfig) -> float:
    """``cfg.lr``, width-scaled when ``cfg.lr_width_reference`` is set (the model's ``cfg.dim``)."""
    if cfg.lr_width_reference is None:
        return cfg.lr
    return cfg.lr * math.sqrt(cfg.lr_width_reference / model.cfg.dim)


def parameter_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """AdamW groups of decayed matrices and of undecayed parameters named in ``cfg.no_decay``; with
    ``kind=muon`` a Muon group of the hidden matrices first (empty groups are left out)."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():  # tied weights appear once, under their first name
        if not p.requires_grad:
            continue
        if cfg.kind == "muon" and muon_lib.uses_muon(name, p, cfg.muon):
            muon.append(p)
        else:
            (no_decay if any(pattern in name for pattern in cfg.no_decay) else decay).append(p)
    adamw = {"lr": adamw_lr(model, cfg)}
    if cfg.kind == "muon":
        adamw.update(muon=False, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, **adamw},
              {"params": no_decay, "weight_decay": 0.0, **adamw}]
    if cfg.kind == "muon":
        m = cfg.muon
        groups.insert(0, {"params": muon, "muon": True, "lr": m.lr, "weight_decay": m.weight_decay,
                          "momentum": m.momentum, "nesterov": m.nesterov, "ns_steps": m.ns_steps})
        groups = [g for g in groups if g["params"]]
    return groups


def optimizer_factory(cfg: OptimizerConfig, device: torch.device) -> Callable[[nn.Module], torch.optim.Optimizer]:
    fused = cfg.fused if cfg.fused is not None else device.type in ("cpu", "cuda")

    def make(model: nn.Module) -> torch.optim.Optimizer:
        if cfg.kind == "muon":
            return muon_lib.Muon(parameter_groups(model, cfg),
                                 ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        return torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 eps=cfg.eps, fused=fused or None, foreach=None if fused else True)
    return make


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, objective: Objective, data: Any, *,
                 parallel: ParallelConfig | None = None,
                 store: ckpt.CheckpointStore | None = None,
                 val_data: Callable[[], Iterable[Any]] | None = None,
                 token_bytes: torch.Tensor | None = None,
                 flops_per_token: int | None = None,
                 writer: metrics_lib.MetricsWriter | None = None,
                 hooks: Iterable[Callable[[int, dict], None]] = (), device: torch.device | None = None,
                 init: param_init.Source | None = None):
        """``model`` is materialized, or on ``meta`` (built by ``llama.build(cfg, "meta")``): then it is
        split and sharded first and each rank materializes only its part on ``device`` and fills it
        from ``init`` (default: initialized from ``cfg.seed``; the same weights on every layout)."""
        self.cfg = cfg
        self.objective = objective
        self.data = data
        self.store = store
        self.val_data = val_data
        self.flops_per_token = flops_per_token
        self.writer = writer
        self.hooks = list(hooks)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        on_meta = next(model.parameters()).device.type == "meta"
        if self.device.type == "meta":
            raise ValueError("a model on the meta device needs device= (where its shards are materialized)")
        if init is not None and not on_meta:
            raise ValueError("init= fills a model built on meta; this model is already materialized")
        shape = getattr(model, "cfg", None)
        self.dtype = precision.compute_dtype(cfg.precision, self.device, getattr(shape, "dim", None),
                                             getattr(shape, "ffn_hidden_dim", None))
        parallel = parallel or ParallelConfig(strategy="none" if self.world_size == 1 else "fsdp2")
        if cfg.optimizer.kind == "muon":
            muon_lib.check_supported(parallel.strategy)
        dims = parallel.dims(self.world_size)
        # tensor- and pipeline-parallel peers read the same rows: count each batch once
        self.batch_copies = dims.world_size // dims.dp
        materialize = functools.partial(param_init.materialize, device=self.device,
                                        source=init or param_init.seeded(cfg.seed, model.init_rule)) \
            if on_meta else None
        self.engine = build_engine(model, optimizer_factory(cfg.optimizer, self.device), parallel,
                                   world_size=self.world_size, param_dtype=self.dtype, device=self.device,
                                   grad_clip=cfg.grad_clip, materialize=materialize,
                                   pipeline_loss=objective.pipeline_loss if objective.token_targets else None)
        self.pipelined = isinstance(self.engine, PipelineEngine)
        self.autocast = self.dtype is not None and not casts_parameters(parallel, self.world_size)
        # pipeline ranks hold one optimizer per stage: one schedule drives them all
        self.scheduler = LRScheduler(self.engine.optimizers, cfg.schedule, cfg.steps, cfg.optimizer.lr)
        self.guard = StabilityGuard(cfg.guards)
        self.token_bytes = token_bytes.to(self.device) if token_bytes is not None else None
        self.step = 0
        self.peak_flops = cfg.peak_flops
        self.result = TrainResult(steps=0)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, resume_from: str | Path | None = None) -> TrainResult:
        """Train to ``cfg.steps``, resuming from the store's latest checkpoint or ``resume_from``."""
        self.resume(resume_from)
        if self.peak_flops is None and self.flops_per_token:
            self.peak_flops = metrics_lib.peak_flops(self.device, self.dtype or torch.float32)
        last_checkpoint = self.step
        while self.step < self.cfg.steps:
            record = self.train_step()
            metrics = self._metrics(record)
            evaluate = self.cfg.eval_every and self.step % self.cfg.eval_every == 0
            if evaluate or self.step == self.cfg.steps:
                metrics.update(self.evaluate())
            checkpoint = bool(self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0) \
                or self.step == self.cfg.steps
            if self.rank == 0 and self.writer is not None and (self.step % self.cfg.log_every == 0
                                                               or "val_loss" in metrics or checkpoint):
                # stored before the checkpoint: a run resumed from it has every line up to it
                self.writer.write(self.step, metrics, durable=checkpoint)
            if checkpoint and self.store is not None and self.step != last_checkpoint:
                self.save_checkpoint(metrics)
                last_checkpoint = self.step
            elif self.step % self.cfg.log_every == 0 and self.store is not None:
                self.store.report(metrics)
            for hook in self.hooks:
                hook(self.step, metrics)
            self.result.last_metrics = metrics
        self.result.steps = self.step
        self.result.guard_counts = dict(self.guard.counts)
        return self.result

    def train_step(self) -> StepRecord:
        start = time.perf_counter()
        batches = [next(self.data) for _ in range(self.cfg.grad_accum)]
        weight = self._all_reduce(float(sum(self.objective.weight(b) for b in batches)))
        tokens = int(self._all_reduce(float(sum(self.objective.tokens(b) for b in batches)))) // self.batch_copies
        scale = self.world_size / weight
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, batch in enumerate(batches):
            if self.pipelined:  # the schedule runs forward and backward; the loss is summed over the pp group
                inputs, targets = self.objective.inputs_and_targets(batch)
                with self._autocast():
                    loss_sum += self.engine.forward_backward(inputs, targets, scale)
                continue
            with self._autocast():
                out = self.objective.loss(self.engine.model, _to_device(batch, self.device))
            self.engine.backward(out.loss_sum * scale, last_micro_batch=i == len(batches) - 1)
            loss_sum += out.loss_sum.detach().double()
        loss = self._all_reduce(loss_sum) / weight
        grad_norm = self.engine.clip_grad_norm(self.cfg.grad_clip)
        lr = self.scheduler.lr
        verdict = self.guard.check(self.step + 1, loss, grad_norm if grad_norm is not None else 0.0)
        if verdict is Verdict.STEP:
            self.engine.step()
            grad_norm = grad_norm if grad_norm is not None else self.engine.last_grad_norm()
        else:
            self.engine.discard_step()
        record = StepRecord(self.step + 1, loss, grad_norm, lr, verdict.value, tokens,
                            time.perf_counter() - start)
        self.result.records.append(record)
        if verdict is Verdict.ROLLBACK:
            self.rollback()
        else:
            self.scheduler.step()
            self.step += 1
        if verdict is not Verdict.STEP:
            log.warning("step %d: %s (loss %.4g, grad norm %s)", record.step, verdict.value, loss, grad_norm)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (and bits per byte) on the first ``eval_batches`` micro-batches of ``val_data``."""
        if self.val_data is None:
            return {}
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # nats, weight, bits, bytes
        for batch, _ in zip(self.val_data(), range(self.cfg.eval_batches)):
            if self.pipelined:
                inputs, targets = self.objective.inputs_and_targets(batch)
                with self._autocast():
                    totals += self.engine.evaluate(inputs, targets, self._validation_sums, width=4)
                continue
            batch = _to_device(batch, self.device)
            with self._autocast():
                if self.token_bytes is not None and self.objective.token_targets:
                    inputs, targets = self.objective.inputs_and_targets(batch)
                    totals += self._validation_sums(self.engine.model(inputs), targets)
                else:
                    out = self.objective.loss(self.engine.model, batch)
                    totals[0] += float(out.loss_sum)
                    totals[1] += out.weight
        if dist.is_initialized():
            dist.all_reduce(totals)
        if totals[1] == 0:
            return {}
        result = {"val_loss": float(totals[0] / totals[1])}
        if totals[3] > 0:
            result["val_bpb"] = float(totals[2] / totals[3])
        self.result.evals.append({"step": self.step, **result})
        return result

    def _validation_sums(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(nats, target tokens, bits, bytes) of one micro-batch from its logits (under pipeline
        parallelism, the last stage's)."""
        nats = token_cross_entropy(logits, targets)
        bits, nbytes = bits_per_byte(nats, targets, self.token_bytes) if self.token_bytes is not None else (0.0, 0)
        return torch.tensor([float(nats.sum()), int((targets != IGNORE_INDEX).sum()), bits, nbytes],
                            dtype=torch.float64, device=self.device)

    # -- checkpoints ---------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "world_size": self.world_size, "rank": self.rank,
                "data": self.data.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
                "guard": self.guard.state_dict()}

    def save_checkpoint(self, metrics: dict) -> None:
        directory = self.store.staging_dir(self.step)
        ckpt.write_trainer_state(directory, self.rank, self.trainer_state())
        self.engine.save(directory)
        self.store.commit(self.step, directory, {**metrics, "step": self.step})

    def resume(self, resume_from: str | Path | None = None) -> None:
        """Restore the newest complete checkpoint of the store, else ``resume_from``, else start fresh."""
        found = self.store.latest() if self.store is not None else None
        if found is None and resume_from is not None:
            ok, why = ckpt.is_complete(Path(resume_from))
            if not ok:
                raise ValueError(f"resume_from={resume_from} is not a complete checkpoint: {why}")
            found = Path(resume_from)
        if found is None:
            return
        self.restore(found)
        self.result.resumed_from = str(found)
        if self.rank == 0:
            log.info("resumed from %s at step %d", found, self.step)

    def restore(self, directory: Path, *, data: bool = True, guard: bool = True) -> None:
        """Load a checkpoint; ``data=False``/``guard=False`` keep the current data position / guard history."""
        directory = Path(directory)
        saved_rank = self.rank if ckpt.trainer_state_path(directory, self.rank).is_file() else 0
        state = ckpt.read_trainer_state(directory, saved_rank)
        self.engine.load(directory)
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])  # the step count; the peak lr stays this config's
        if data:  # the loader's position is global, so any rank's state restores any world size
            self.data.load_state_dict(state["data"])
        if guard:
            self.guard.load_state_dict(state["guard"])
        if state["world_size"] == self.world_size:
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def rollback(self) -> None:
        found = self.store.latest() if self.store is not None else None
        if found is None:
            raise RuntimeError(f"step {self.step + 1}: the guard asked for a rollback but there is no "
                               "checkpoint yet; set train.checkpoint_every or guards.rollback_after=0")
        self.restore(found, data=False, guard=False)
        if self.rank == 0:
            log.warning("rolled back to %s (step %d); data continues past the spiking batches", found, self.step)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights on CPU (a collective: every rank calls it; rank 0 writes them)."""
        return self.engine.full_model_state()

    # -- helpers -------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _all_reduce(self, value: float | torch.Tensor) -> float:
        tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
        tensor = tensor.to(self.device, torch.float64)
        if dist.is_initialized():
            dist.all_reduce(tensor)
        return float(tensor)

    def _metrics(self, r: StepRecord) -> dict:
        tokens_per_s = r.tokens / r.seconds
        m = {"loss": r.loss, "lr": r.lr, "tokens_per_s": tokens_per_s, "step_time_s": r.seconds,
             "memory_mb": metrics_lib.memory_mb(self.device), **{k: float(v) for k, v in self.guard.counts.items()}}
        if r.grad_norm is not None:
            m["grad_norm"] = r.grad_norm
        if self.flops_per_token and self.peak_flops:
            m["mfu"] = metrics_lib.mfu(self.flops_per_token, tokens_per_s, self.peak_flops, self.world_size)
            if m["mfu"] > 1.0 and self.cfg.peak_flops is None:
                m["mfu"] = self._remeasure_peak(tokens_per_s)
        if not math.isfinite(r.loss):
            m["loss"] = float("nan")
        return m


    def _remeasure_peak(self, tokens_per_s: float) -> float:
        """MFU above 1 means the start-up peak was measured while other work held the cores: measure
        again, keep the higher peak, recompute. Per rank and without collectives (ranks time their
        steps separately, so they need not all get here; rank 0's figure is the one written)."""
        self.peak_flops = max(self.peak_flops, metrics_lib.measured_peak_flops(
            self.device, self.dtype or torch.float32, again=True))
        if self.rank == 0:
            log.warning("model FLOP/s exceeded the measured peak; re-measured the peak: %.1f GFLOP/s per worker "
                        "(the start-up measurement was taken under load)", self.peak_flops / 1e9)
        return metrics_lib.mfu(self.flops_per_token, tokens_per_s, self.peak_flops, self.world_size)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch

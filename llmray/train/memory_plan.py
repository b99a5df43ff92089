"""Per-rank memory of a training layout, estimated from shapes alone: ``llmray plan`` and the check before training.

Why: a layout that cannot fit fails minutes into a cluster run (or never starts), with an
out-of-memory error that names no cause. The shapes say enough to predict it: the model is counted
on ``meta`` (no allocation, so 8B and 70B plan on a laptop) and each term is the standard
accounting of mixed-precision training, per rank:

* **parameters**: fp32 master weights of what the rank holds: 2-D matrices split over ``tp``
  (norm vectors replicated), the rank's pipeline stages only, then FSDP2 / ZeRO-3 shards over
  ``dp_shard`` (DeepSpeed ZeRO-1/2 keep whole replicas);
* **gathered**: FSDP2 and ZeRO-3 all-gather a block's weights (in the compute dtype) to run it:
  two blocks at a time (one prefetched) plus the root's embedding and head;
* **gradients**: fp32, sharded like the parameters (ZeRO-1: whole);
* **optimizer**: AdamW 8 bytes per parameter (two fp32 moments), Muon 4 on its hidden matrices
  (one momentum), sharded over ``dp`` by FSDP2 and every ZeRO stage;
* **activations**: what backward needs of one micro-batch, per token per layer about
  ``7·dim + 3·kv_dim + 4·ffn_hidden`` values in the compute dtype, the tensor-parallel parts over
  ``tp`` (the ``dim`` parts too under sequence parallelism); with activation checkpointing one
  ``dim`` vector per layer plus one layer recomputed; under 1F1B the first stage holds ``pp``
  micro-batches in flight; plus the fused loss's working set (a 256-token chunk of logits twice
  and the head's fp32 gradient);
* **workspace**: 1 GiB on GPUs (CUDA context, kernels and allocator slack), none on CPU.

The total is the sum, except where gradients only exist during backward (one micro-batch per step,
freed after it): backward allocates them as it frees the activations, so only the larger of the
two counts (measured on a 443M model in one process: 6.67 GB against 8.00 summed and 6.60 with
the larger). ZeRO-3's gradient partitions are allocated the same way
(:mod:`llmray.parallel.zero3_memory`). Accumulated gradients (``grad_accum`` > 1, pipeline
micro-batches) and ZeRO-1/2's preallocated gradient buffers live beside a whole micro-batch's
activations.

A rank fits when the total is at most its device memory. ``bench/memory.py`` compares these
figures with measured peaks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass

from llmray.model.config import ModelConfig
from llmray.model.linear_cross_entropy import CHUNK_TOKENS
from llmray.parallel import ParallelConfig

GIB = 2 ** 30
GPU_WORKSPACE = 1 * GIB
TERMS = ("parameters", "gathered", "gradients", "optimizer", "activations", "workspace")


class LayoutDoesNotFit(ValueError):
    """The planned per-rank memory exceeds the device's."""


@dataclass
class RankPlan:
    """Bytes per term for the ranks of one pipeline stage group."""

    ranks: str
    params: int  # elements held (after every split)
    terms: dict[str, int]
    gradients_replace_activations: bool = False  # allocated as backward frees activations (see above)

    @property
    def total(self) -> int:
        overlap = min(self.terms["gradients"], self.terms["activations"]) if self.gradients_replace_activations else 0
        return sum(self.terms.values()) - overlap

    @property
    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)


def plan(model: ModelConfig, parallel: ParallelConfig, world_size: int, *, seq_len: int, micro_batch_size: int,
         compute_bytes: int, optimizer: str = "adamw", muon_params: tuple[str, ...] = ("layers.",),
         gpu: bool = False, grad_accum: int = 1) -> list[RankPlan]:
    """One :class:`RankPlan` per pipeline rank (every rank of a stage group is the same)."""
    from llmray.model import llama
    from llmray.parallel.pipeline import split_layers, stage_indices

    dims = parallel.dims(world_size)
    meta = llama.build(model, "meta")
    sizes = {name: tuple(p.shape) for name, p in meta.named_parameters()}
    num_stages = dims.pp * parallel.pipeline.virtual_stages
    split = split_layers(model, num_stages, parallel.pipeline.layers_per_stage) if dims.pp > 1 \
        else [[str(i) for i in range(model.n_layers)]]
    layer_size = {str(i): sum(math.prod(shape) for name, shape in sizes.items() if name.startswith(f"layers.{i}."))
                  for i in range(model.n_layers)}
    plans = []
    for pp_rank in range(dims.pp):
        stages = stage_indices(pp_rank, dims.pp, parallel.pipeline.virtual_stages) if dims.pp > 1 else [0]
        layers = [layer for s in stages for layer in split[s]]
        first, last = 0 in stages, num_stages - 1 in stages
        held = {name: size for name, size in sizes.items() if _on_stage(name, layers, first, last)}
        plans.append(_rank_plan(model, parallel, dims, held, layers, layer_size, first, last, seq_len,
                                micro_batch_size, compute_bytes, optimizer, muon_params, gpu,
                                ranks=_ranks_text(dims, pp_rank)))
    micro_batches = grad_accum * (parallel.pipeline.microbatches if dims.pp > 1 else 1)
    fresh_gradients = micro_batches == 1 and (parallel.strategy != "deepspeed" or parallel.zero_stage == 3)
    return [dataclasses.replace(p, gradients_replace_activations=fresh_gradients) for p in plans]


def _rank_plan(model, parallel, dims, held, layers, layer_size, first, last, seq_len, micro_batch_size,
               compute_bytes, optimizer, muon_params, gpu, ranks) -> RankPlan:
    tp, dp = dims.tp, dims.dp
    # the largest rank's share: TP splits every matrix on one dimension (rows first: vocabulary, heads)
    split_tp = {name: math.ceil(shape[0] / tp) * shape[1] if len(shape) == 2 else shape[0]
                for name, shape in held.items()}
    local = sum(split_tp.values())
    deepspeed = parallel.strategy == "deepspeed"
    stage = parallel.zero_stage if deepspeed else (3 if dims.dp_shard > 1 else 0)
    shard = dims.dp_shard if not deepspeed else dp
    params = math.ceil(local / shard) if stage == 3 else local
    grads = math.ceil(local / shard) if stage >= 2 else local
    muon = {name for name, shape in held.items() if len(shape) == 2 and any(p in name for p in muon_params)} \
        if optimizer == "muon" else set()
    moments = sum(n * (4 if name in muon else 8) for name, n in split_tp.items())
    optimizer_bytes = math.ceil(moments / dp) if stage >= 1 or dims.dp_shard > 1 else moments
    gathered = 0
    if stage == 3:
        blocks = sorted((math.ceil(layer_size[name] / tp) for name in layers), reverse=True)[:2]
        root = sum(n for name, n in split_tp.items() if not name.startswith("layers."))
        gathered = (sum(blocks) + root) * compute_bytes
    terms = {"parameters": 4 * params, "gathered": gathered, "gradients": 4 * grads,
             "optimizer": optimizer_bytes,
             "activations": _activations(model, parallel, dims, len(layers), last, seq_len, micro_batch_size,
                                         compute_bytes),
             "workspace": GPU_WORKSPACE if gpu else 0}
    return RankPlan(ranks, params, terms)


def _activations(model: ModelConfig, parallel: ParallelConfig, dims, n_layers: int, last: bool, seq_len: int,
                 micro_batch_size: int, compute_bytes: int) -> int:
    tp = dims.tp
    kv_dim = model.n_kv_heads * model.head_dim
    residual_parts = 7 * model.dim / (tp if parallel.sequence_parallel else 1)
    per_token_layer = residual_parts + (3 * kv_dim + 4 * model.ffn_hidden_dim) / tp
    tokens = seq_len * micro_batch_size
    if dims.pp > 1:  # 1F1B: the first stage keeps pp pipeline micro-batches of B/m rows in flight
        micro = parallel.pipeline.microbatches
        tokens = seq_len * math.ceil(micro_batch_size / micro) * min(dims.pp, micro)
    if parallel.activation_checkpointing:
        values = tokens * (n_layers * model.dim / (tp if parallel.sequence_parallel else 1) + per_token_layer)
    else:
        values = tokens * n_layers * per_token_layer
    loss = 0
    if last:  # the fused loss: a chunk of logits and its log-softmax (fp32), and the head's fp32 gradient
        vocab = math.ceil(model.vocab_size / tp)
        loss = 2 * 4 * CHUNK_TOKENS * vocab + 4 * vocab * model.dim
    return int(values * compute_bytes) + loss


def _on_stage(name: str, layers: list[str], first: bool, last: bool) -> bool:
    if name.startswith("layers."):
        return name.split(".")[1] in layers
    if name.startswith("tok_embeddings."):
        return first
    return last  # the final norm and the head


def _ranks_text(dims, pp_rank: int) -> str:
    per_stage = dims.world_size // dims.pp
    if dims.pp == 1:
        return f"all {dims.world_size}"
    return f"pp stage {pp_rank} ({per_stage} rank{'s' if per_stage > 1 else ''})"


def check_fits(plans: list[RankPlan], device_bytes: int, where: str) -> None:
    """Raise :class:`LayoutDoesNotFit` naming the largest term of the worst rank and what to change."""
    worst = max(plans, key=lambda p: p.total)
    if worst.total <= device_bytes:
        return
    term = worst.largest
    advice = {"activations": "turn on parallel.activation_checkpointing, lower batch.micro_batch_size, or raise "
                             "parallel.tp with parallel.sequence_parallel",
              "workspace": "use a device with more memory"}.get(
        term, "shard further: more workers (FSDP2 dp_shard), parallel.tp or parallel.pp, or "
              "parallel.strategy=deepspeed with zero_stage=3")
    terms = ", ".join(f"{k} {v / GIB:.1f}" for k, v in worst.terms.items() if v)
    raise LayoutDoesNotFit(
        f"this layout does not fit {where}: ranks '{worst.ranks}' need {worst.total / GIB:.1f} GiB of "
        f"{device_bytes / GIB:.1f} GiB (GiB: {terms}); the largest term is {term}: {advice} "
        "(`llmray plan --config ...` prints the plan)")


def device_memory(device) -> int:
    """Bytes a worker may use: the GPU's memory, or the memory the host has available now."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def format_table(plans: list[RankPlan], device_bytes: int | None) -> str:
    header = ["ranks", "params/rank"] + list(TERMS) + ["total GiB", "fits"]
    rows = [header]
    for p in plans:
        fits = "-" if device_bytes is None else ("yes" if p.total <= device_bytes else "NO")
        rows.append([p.ranks, f"{p.params / 1e6:,.1f}M"] + [f"{p.terms[t] / GIB:.2f}" for t in TERMS]
                    + [f"{p.total / GIB:.2f}", fits])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '512MB' or a plain byte count (GB and GiB both mean 2**30 here, as GPU specs do)."""
    units = {"tb": 2 ** 40, "tib": 2 ** 40, "gb": GIB, "gib": GIB, "mb": 2 ** 20, "mib": 2 ** 20, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if lowered.endswith(unit):
            return int(float(lowered[:-len(unit)]) * factor)
    return int(lowered)


def add_parser(subparsers) -> None:
    """``llmray plan``: the per-rank memory table of a pretraining config, without allocating."""
    parser = subparsers.add_parser(
        "plan", help="per-rank memory of a training layout (no allocation; any preset, 8B and 70B included)",
        description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", required=True, help="a pretraining config (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override any config key")
    parser.add_argument("--model", default=None, help="plan this model preset instead (e.g. llama3-70b)")
    parser.add_argument("--gpus", type=int, default=None, help="workers (one GPU each); default: execution.workers")
    parser.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GB; the table then says "
                                                           "whether each rank fits and the command fails if not")
    parser.set_defaults(handler=_plan_command)


def _plan_command(args: argparse.Namespace) -> int:
    from llmray import config as config_lib
    from llmray.model.config import preset
    from llmray.train.pretrain import PretrainConfig

    cfg = config_lib.load(PretrainConfig, args.config, args.overrides)
    model = preset(args.model) if args.model else cfg.model
    workers = args.gpus or cfg.execution.workers
    device_bytes = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    gpu = bool(args.gpus or args.gpu_memory or cfg.execution.use_gpu)
    compute_bytes = 2 if cfg.train.precision == "bf16" or (gpu and cfg.train.precision == "auto") else 4
    plans = plan(model, cfg.parallel, workers, seq_len=cfg.batch.seq_len,
                 micro_batch_size=cfg.batch.micro_batch_size, compute_bytes=compute_bytes,
                 optimizer=cfg.train.optimizer.kind, muon_params=tuple(cfg.train.optimizer.muon.params), gpu=gpu,
                 grad_accum=cfg.train.grad_accum)
    print(f"{model.num_params() / 1e9:.2f}B parameters on {workers} workers; "
          f"{dataclasses.asdict(cfg.parallel.dims(workers))}; compute {'bf16' if compute_bytes == 2 else 'fp32'}")
    print(format_table(plans, device_bytes))
    if device_bytes is not None:
        try:
            check_fits(plans, device_bytes, f"on GPUs of {args.gpu_memory}")
        except LayoutDoesNotFit as exc:
            print(f"llmray plan: {exc}", file=sys.stderr)
            return 1
    return 0

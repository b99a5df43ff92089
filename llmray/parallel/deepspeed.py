"""DeepSpeed ZeRO stage 1/2/3 behind the same engine API as FSDP2.

Choices (measured, see PITFALLS.md):

* The optimizer is the trainer's own ``torch.optim.AdamW`` passed to ``deepspeed.initialize``; a
  config optimizer ``"AdamW"`` would silently become DeepSpeed's FusedAdam, a ~70 s JIT build
  on CPU. DeepSpeed's fused/CPU Adam are therefore not used here.
* ``TORCH_EXTENSIONS_DIR`` defaults to ``~/.cache/llmray/torch_extensions``: the first
  ``init_distributed`` on CPU JIT-builds a shared-memory comm op (~65 s), cached there once.
* Gradient accumulation is the trainer's: the accumulation boundary is set explicitly before
  each backward (sync only on the last micro-batch), losses are scaled by the trainer
  (``scale_wrt_gas=False``), and ``step()`` is called once per optimizer step.
* Gradient clipping is DeepSpeed's (``gradient_clipping``), because under ZeRO-2/3 gradients are
  partitioned inside the optimizer; the global norm is read back after the step. The stability
  guard therefore judges the loss before the step; a skipped step drops the partitioned
  gradients exactly as DeepSpeed's own overflow path does (weights and optimizer untouched).
  DeepSpeed itself also skips steps whose gradient norm is not finite.
* ZeRO-3 on a ``meta`` model partitions at initialization: each module is materialized and
  handed at once to ``deepspeed.zero.Init(module=...)`` (:func:`partitioner`), which keeps this
  rank's partition of its parameters, so no rank ever holds the whole model (one module's
  parameters at a time). With bf16 they are cast first, as ``deepspeed.initialize`` would
  cast a whole model.
* ZeRO-3 holds its gradient partitions only from the first backward to the optimizer step, never
  copies its fp32 partitions and never gathers a full parameter at initialization
  (:mod:`llmray.parallel.zero3_memory`).
* Checkpoints are DeepSpeed's own ZeRO files under ``<checkpoint>/deepspeed/`` (they cannot
  be resharded to another world size; FSDP2's DCP checkpoints can).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from llmray.parallel import zero3_memory

DEEPSPEED_DIR = "deepspeed"  # the ZeRO files' folder inside a checkpoint directory
TAG = "state"


def extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "llmray" / "torch_extensions"))


def model_width(model: nn.Module) -> int:
    """The model's hidden size (``cfg.dim`` of an llmray model; else the narrowest input width of
    its matrices, which in a transformer is the hidden size)."""
    shape = getattr(model, "cfg", None)
    if shape is not None:
        return shape.dim
    return min(p.shape[-1] for p in model.parameters() if p.dim() == 2)


def engine_config(stage: int, bf16: bool, hidden: int, grad_clip: float = 0.0) -> dict:
    """DeepSpeed's config. Buckets are sized from the model's width (``hidden``, as Hugging Face's
    DeepSpeed integration sizes its "auto" values) and ZeRO-3 frees gathered parameters after
    use: DeepSpeed's fixed defaults (500M-element reduce buckets, a billion live parameters) are
    sized for large GPU models, and on a 125M model on CPU a ZeRO-3 rank peaked at 1.43x a single
    process's memory after 3 steps (see bench/RESULTS.md for the figures with these)."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: batches are the trainer's
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": hidden * hidden,
                              "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                              "stage3_param_persistence_threshold": 10 * hidden,
                              # like FSDP2's reshard after forward: gathered parameters are freed
                              # after use, and at most about two blocks' worth are alive at once
                              "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 24 * hidden * hidden,
                              # the optimizer steps ~one block's partitions at a time, so its
                              # flat fp32 gradient is never a copy of the whole partition
                              "sub_group_size": 12 * hidden * hidden},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2 ** 31 - 1,
        "zero_allow_untested_optimizer": True,
    }


def load():
    """The deepspeed module, its JIT-built ops cached under :func:`extensions_dir`."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    import deepspeed

    return deepspeed


def partitioner(bf16: bool, hidden: int) -> Callable[[nn.Module], None]:
    """What ZeRO-3 does to each freshly materialized module: keep this rank's partition of its
    parameters (the parameters of its children are partitioned already)."""
    deepspeed = load()
    config = engine_config(3, bf16, hidden)

    def partition(module: nn.Module) -> None:
        if bf16:
            for param in module.parameters(recurse=False):
                param.data = param.data.to(torch.bfloat16)
        deepspeed.zero.Init(module=module, config_dict_or_path=config)

    return partition


class DeepSpeedEngine:
    def __init__(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 stage: int, *, world_size: int, bf16: bool, hidden: int, grad_clip: float = 0.0):
        deepspeed = load()
        zero3_memory.install()
        self.base_optimizer = make_optimizer(model)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.base_optimizer,
                                                                config=engine_config(stage, bf16, hidden, grad_clip))
        self.world_size = world_size
        self.stage = stage

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizer the learning-rate schedule drives (DeepSpeed wraps it)."""
        return [self.base_optimizer]

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self.model.set_gradient_accumulation_boundary(last_micro_batch)
        self.model.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> float | None:
        return None  # clipped inside step(); see last_grad_norm()

    def last_grad_norm(self) -> float | None:
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step(self) -> None:
        self.model.step()

    def discard_step(self) -> None:
        """Drop this step's gradients, as DeepSpeed's own overflow path does, without updating anything."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if self.stage == 3:
            zero3_memory.release_gradient_partitions(opt)
        else:
            if hasattr(opt, "_release_preflattened_grad_buffers"):
                opt._release_preflattened_grad_buffers()
            for key in list(opt.averaged_gradients.keys()):
                opt.averaged_gradients[key] = None
                opt.all_grad_tensors[key] = None
        self.model.set_gradient_accumulation_boundary(False)

    def save(self, directory: Path) -> None:
        self.model.save_checkpoint(str(Path(directory) / DEEPSPEED_DIR), tag=TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(str(Path(directory) / DEEPSPEED_DIR), load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {Path(directory) / DEEPSPEED_DIR}")

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 model weights on CPU (ZeRO-3 partitions are gathered: collective)."""
        import deepspeed

        module = self.model.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                               enabled=self.stage == 3):
            return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in module.state_dict().items()}

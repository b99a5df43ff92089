"""Three changes to how DeepSpeed's ZeRO-3 optimizer holds memory, so that a rank holds its
partition and little else (measured with DeepSpeed 0.19 on the 443M model of bench/memory.py).

* **Master partitions are not copies** (:func:`build_master_partitions_without_copies`). With
  fp32 parameters DeepSpeed means to skip the fp32 master copy, but it compares a tensor's
  ``torch.device`` with the device's *name*, never equal, so every partition was cloned.
* **Gradient partitions exist only between the first backward and the optimizer step**
  (:func:`allocate_gradient_partitions_on_demand`), as ``zero_grad(set_to_none=True)`` gives a
  plain model. DeepSpeed allocates and zero-fills one flat buffer for the whole gradient
  partition in ``deepspeed.initialize`` and keeps it for good, so it sits beside the parameters
  from initialization on and beside all activations in every forward (0.83 GB per rank here).
* **Gradient hooks are registered without gathering** (:func:`register_gradient_hooks_without_gathering`).
  DeepSpeed gathers each full parameter, one at a time, only to register a hook that torch ≥ 2.1
  registers on the partitioned parameter just as well (0.24 GB transient at initialization here:
  the largest parameter and its gather buffer).

These touch DeepSpeed's private ZeRO-3 internals, so ``pyproject.toml`` bounds DeepSpeed to the
minor version the tests run against. :func:`install` applies all three, once per process.
"""

from __future__ import annotations

import torch

# DeepSpeed's name-mangled map from a parameter's ``ds_id`` to its gradient partition.
PARTITION_MAP = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"


def install() -> None:
    build_master_partitions_without_copies()
    allocate_gradient_partitions_on_demand()
    register_gradient_hooks_without_gathering()


def _patch_once(cls: type, name: str, make) -> None:
    """Replace ``cls.name`` by ``make(original)``, unless this process did so already."""
    original = getattr(cls, name)
    if getattr(original, "patched_by_llmray", False):
        return
    replacement = make(original)
    replacement.patched_by_llmray = True
    setattr(cls, name, replacement)


def _stage3():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return DeepSpeedZeroOptimizer_Stage3


def build_master_partitions_without_copies() -> None:
    """Run the method that builds the master partitions with the optimizer's device as a
    ``torch.device``, so DeepSpeed's "already fp32 on this device" test can succeed."""
    def make(build):
        def create_fp32_partitions(self) -> None:
            name = self.device
            self.device = torch.device(name)
            try:
                build(self)
            finally:
                self.device = name
        return create_fp32_partitions

    _patch_once(_stage3(), "_create_fp32_partitions", make)


class GradientPartitions(dict):
    """ZeRO-3's ``ds_id`` → gradient partition map, filled one optimizer sub-group (~one block) at a
    time when backward first writes into it, and emptied by :func:`release_gradient_partitions`.

    Backward produces gradients from the last block to the first while it frees activations in
    the same order, so a rank no longer holds a full gradient partition beside all activations.
    Each sub-group's partitions are views of one zero-filled flat tensor, as DeepSpeed's single
    buffer was (the optimizer flattens them per sub-group either way). DeepSpeed's accessors
    that read a gradient (``safe_get_full_grad`` and the like) read zeros outside backward-to-step,
    where they read the last step's before, and its ``offload_states`` expects the flat buffer;
    llmray uses neither.
    """

    def __init__(self, sub_groups: list[list[torch.nn.Parameter]], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.sub_group_of = {param.ds_id: group for group in sub_groups for param in group}
        self.dtype = dtype
        self.device = device

    def __missing__(self, ds_id: int) -> torch.Tensor:
        group = self.sub_group_of[ds_id]
        flat = self._zeros(sum(param.partition_numel() for param in group))
        offset = 0
        for param in group:
            self[param.ds_id] = flat.narrow(0, offset, param.partition_numel())
            offset += param.partition_numel()
        return self[ds_id]

    def _zeros(self, numel: int) -> torch.Tensor:
        """A zero-filled buffer that, once freed, the next forward's activations can reuse.

        On CUDA, backward asks for it on DeepSpeed's reduce stream, and the caching allocator
        reuses a freed block only for allocations on the stream that made it; so it is made on
        the default (compute) stream, the reduce stream waits for its zero-fill, and is recorded
        as a user so the block is not handed out again while a reduction may still write it.
        """
        if torch.device(self.device).type != "cuda":
            return torch.zeros(numel, dtype=self.dtype, device=self.device)
        reducing, compute = torch.cuda.current_stream(), torch.cuda.default_stream()
        with torch.cuda.stream(compute):
            flat = torch.zeros(numel, dtype=self.dtype, device=self.device)
        reducing.wait_stream(compute)
        flat.record_stream(reducing)
        return flat


def release_gradient_partitions(optimizer) -> None:
    """Drop every reference to this step's gradient partitions (DeepSpeed keeps a second set in
    ``averaged_gradients``, rebuilt after every backward)."""
    partitions = getattr(optimizer, PARTITION_MAP, None)
    if isinstance(partitions, GradientPartitions):
        partitions.clear()
    optimizer.averaged_gradients = {}


def allocate_gradient_partitions_on_demand() -> None:
    """Install :class:`GradientPartitions` in place of DeepSpeed's flat gradient buffer.

    DeepSpeed allocates that buffer on ``self.device`` right after initializing the optimizer
    states, inside ``_setup_for_real_optimizer``; for that one allocation the device is ``meta``,
    so nothing is allocated, and the map replaces the placeholder when the set-up returns.
    The partitions are released after each optimizer step and when DeepSpeed skips a step
    whose gradient norm is not finite. Optimizer offload and fp16 (whose overflow check scans
    the flat buffer) keep DeepSpeed's buffer; llmray's engine uses neither.
    """
    stage3 = _stage3()

    def make_initialize(initialize):
        def initialize_optimizer_states(self) -> None:
            initialize(self)
            if getattr(self, "gradient_buffer_deferred", False):
                self.device = "meta"
        return initialize_optimizer_states

    def make_setup(setup):
        def setup_for_real_optimizer(self) -> None:
            device = self.device
            self.gradient_buffer_deferred = not self.offload_optimizer and self.dtype != torch.float16
            try:
                setup(self)
            finally:
                self.device = device
            if self.gradient_buffer_deferred:
                self.grad_partitions_flat_buffer = None
                setattr(self, PARTITION_MAP, GradientPartitions(self.fp16_groups, self.gradient_accumulation_dtype,
                                                                device))
        return setup_for_real_optimizer

    def make_release_after(method):
        def release_after(self, *args) -> None:
            method(self, *args)
            if getattr(self, "gradient_buffer_deferred", False):
                release_gradient_partitions(self)
        return release_after

    _patch_once(stage3, "initialize_optimizer_states", make_initialize)
    _patch_once(stage3, "_setup_for_real_optimizer", make_setup)
    _patch_once(stage3, "_post_step", make_release_after)
    _patch_once(stage3, "_overflow_clean_up", make_release_after)


def _nothing(*args, **kwargs) -> None:
    return None


def register_gradient_hooks_without_gathering() -> None:
    """While DeepSpeed registers its gradient hooks, a partitioned parameter is neither gathered
    nor re-partitioned (both are no-ops for that moment); parameters DeepSpeed keeps whole (below
    its persistence threshold) go through its own path unchanged."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def make(create):
        def create_reduce_and_remove_grad_hooks(self) -> None:
            partitioned = [param for group in self.fp16_groups for param in group
                           if param.ds_status == ZeroParamStatus.NOT_AVAILABLE]
            saved = [(param, param.all_gather, param.partition) for param in partitioned]
            for param in partitioned:
                param.all_gather = param.partition = _nothing
            try:
                create(self)
            finally:
                for param, all_gather, partition in saved:
                    param.all_gather, param.partition = all_gather, partition
        return create_reduce_and_remove_grad_hooks

    _patch_once(_stage3(), "create_reduce_and_remove_grad_hooks", make)

"""Data parallelism on 2 gloo ranks against the single-process reference.

Tolerance: per-step losses within 1e-5 relative of the one-process run with the same global
batch (fp32; only the order of floating-point reductions differs).
"""

from __future__ import annotations

import json
import math

import pytest
import torch.distributed as dist

from llmray.parallel import ParallelConfig, zero3_memory
from llmray.train.checkpoint import LocalCheckpointStore, step_dir_name
from llmray.train.guards import GuardConfig
from tests.train_support import Faulty, NaNGradients, make_trainer, spawn_gloo

STEPS = 10
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(shards):
    """One process, global batch 4, grad_accum 2 (micro-batch 2), 10 steps."""
    return make_trainer(shards, steps=STEPS, batch=2, accum=2).fit().losses


class Stop(Exception):
    pass


def stop_at(last_step):
    def hook(step, metrics):
        if step == last_step:
            raise Stop
    return hook


def train_and_dump(shards, out, parallel, stop_after=None, ckpt_root=None, checkpoint_every=0):
    store = LocalCheckpointStore(ckpt_root) if ckpt_root else None
    trainer = make_trainer(shards, steps=STEPS, batch=1, accum=2, parallel=parallel, store=store,
                           checkpoint_every=checkpoint_every, hooks=[stop_at(stop_after)] if stop_after else [])
    try:
        trainer.fit()
    except Stop:
        pass
    if dist.get_rank() == 0:
        out.write_text(json.dumps({str(k): v for k, v in trainer.result.losses.items()}))


def run_two_ranks(shards, tmp_path, parallel):
    out = tmp_path / "losses.json"
    spawn_gloo(2, train_and_dump, shards, out, parallel)
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


def assert_same_losses(losses, reference, steps):
    assert sorted(losses) == list(steps)
    for step in steps:
        assert math.isclose(losses[step], reference[step], rel_tol=RTOL), (step, losses[step], reference[step])


def test_fsdp2_matches_single_process(shards, reference, tmp_path):
    losses = run_two_ranks(shards, tmp_path, ParallelConfig(strategy="fsdp2"))
    assert_same_losses(losses, reference, range(1, STEPS + 1))


def test_fsdp2_checkpoint_reshards_to_one_process(shards, reference, tmp_path):
    """Save at step 5 with 2 FSDP2 ranks; resume in one process; steps 6..10 match the reference."""
    root = tmp_path / "ckpt"
    out = tmp_path / "losses.json"
    spawn_gloo(2, train_and_dump, shards, out, ParallelConfig(strategy="fsdp2"), 5, root, 5)
    assert (root / step_dir_name(5) / ".metadata").is_file()
    resumed = make_trainer(shards, steps=STEPS, batch=4, store=LocalCheckpointStore(root)).fit()
    assert resumed.resumed_from.endswith(step_dir_name(5))
    assert_same_losses(resumed.losses, reference, range(6, STEPS + 1))


SKIPPED_STEP = 8
SPIKE_GUARD = GuardConfig(min_history=5, spike_ratio=3.0)


def skipped_runs() -> dict:
    """Runs whose ``SKIPPED_STEP`` is skipped (its first micro-batch, two a step), by name: a loss
    20× too large, which the spike guard stops; and a right loss with NaN gradients, which one
    process's guard stops and DeepSpeed skips inside its own step."""
    call = 2 * SKIPPED_STEP - 1
    return {"spike": dict(objective=Faulty({call}, 20.0), guards=SPIKE_GUARD),
            "nan_gradients": dict(objective=NaNGradients({call}))}


@pytest.fixture(scope="module")
def skipped_references(shards):
    """One process as in ``reference`` for each of :func:`skipped_runs`."""
    losses = {}
    for run, kwargs in skipped_runs().items():
        result = make_trainer(shards, steps=STEPS, batch=2, accum=2, **kwargs).fit()
        assert result.records[SKIPPED_STEP - 1].verdict.startswith("skip"), result.records[SKIPPED_STEP - 1]
        losses[run] = result.losses
    return losses


def train_zero_stages_and_dump(shards, out, stages):
    """All ZeRO stages in the same two processes (DeepSpeed's import and comm set-up cost ~30 s
    each): a plain run and :func:`skipped_runs`; under ZeRO-3, the gradient elements held after
    each step."""
    losses, held = {}, {}
    for stage in stages:
        for run, kwargs in {"plain": {}, **skipped_runs()}.items():
            after_steps = held.setdefault(f"{stage}/{run}", [])
            trainer = make_trainer(
                shards, steps=STEPS, batch=1, accum=2, parallel=ParallelConfig(strategy="deepspeed", zero_stage=stage),
                hooks=[lambda step, m: after_steps.append(gradient_elements(trainer.engine.optimizer))]
                if stage == 3 else [], **kwargs)
            losses[f"{stage}/{run}"] = {str(k): v for k, v in trainer.fit().losses.items()}
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"losses": losses, "held": held}))


def test_deepspeed_zero_1_2_3_match_single_process_also_across_a_skipped_step(
        shards, reference, skipped_references, tmp_path):
    """A skipped step, by llmray's guard or inside DeepSpeed's step, drops the partitioned
    gradients and changes nothing, as in one process; ZeRO-3 holds no gradients after any step.
    The first DeepSpeed init on a machine JIT-builds its CPU comm op (~65 s, cached after)."""
    out = tmp_path / "losses.json"
    spawn_gloo(2, train_zero_stages_and_dump, shards, out, [1, 2, 3])
    result = json.loads(out.read_text())
    assert sorted(result["losses"]) == [f"{stage}/{run}" for stage in (1, 2, 3)
                                        for run in ("nan_gradients", "plain", "spike")]
    for name, losses in result["losses"].items():
        run = name.split("/")[1]
        expected = reference if run == "plain" else skipped_references[run]
        assert_same_losses({int(k): v for k, v in losses.items()}, expected, range(1, STEPS + 1))
    for name, held in result["held"].items():
        assert held == ([0] * STEPS if name.startswith("3/") else []), name


def zero3_stop_resume_and_dump(shards, out, root):
    """ZeRO-3 stops after step 5 (checkpointed), a fresh engine resumes to step 10; the master
    partitions are the parameter partitions themselves (never copied, not even while the engine
    is built) before and after the load. Gradient partitions exist only from backward to the
    optimizer step: none after the engine is built or after a step, all of them before each step."""
    parallel = ParallelConfig(strategy="deepspeed", zero_stage=3)
    first = make_trainer(shards, steps=STEPS, batch=1, accum=2, parallel=parallel, store=LocalCheckpointStore(root),
                         checkpoint_every=5, hooks=[stop_at(5)])
    try:
        first.fit()
    except Stop:
        pass
    resumed = make_trainer(shards, steps=STEPS, batch=1, accum=2, parallel=parallel, store=LocalCheckpointStore(root))
    optimizer = resumed.engine.optimizer
    shared_before_load = one_fp32_copy(optimizer)
    gradients = {"built": gradient_elements(optimizer), "before_steps": []}
    step = resumed.engine.step

    def step_and_count():
        gradients["before_steps"].append(gradient_elements(optimizer))
        step()
    resumed.engine.step = step_and_count
    resumed.fit()
    gradients["after_fit"] = gradient_elements(optimizer)
    gradients["partition"] = sum(p.ds_tensor.numel() for p in resumed.engine.model.module.parameters())
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"first": {str(k): v for k, v in first.result.losses.items()},
                                   "resumed": {str(k): v for k, v in resumed.result.losses.items()},
                                   "one_copy": [shared_before_load, one_fp32_copy(optimizer)], "gradients": gradients}))


def one_fp32_copy(optimizer) -> bool:
    return all(master is partition for master, partition
               in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat))


def gradient_elements(optimizer) -> int:
    """Elements of the gradient partitions the ZeRO-3 optimizer holds (each storage once)."""
    partitions = [optimizer.grad_partitions_flat_buffer, *getattr(optimizer, zero3_memory.PARTITION_MAP).values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() // t.element_size()
                for t in partitions if t is not None}
    return sum(storages.values())


def test_zero3_resumes_exactly_with_one_fp32_copy_of_its_partitions(shards, reference, tmp_path):
    out = tmp_path / "losses.json"
    spawn_gloo(2, zero3_stop_resume_and_dump, shards, out, tmp_path / "ckpt")
    result = json.loads(out.read_text())
    assert_same_losses({int(k): v for k, v in result["first"].items()}, reference, range(1, 6))
    assert_same_losses({int(k): v for k, v in result["resumed"].items()}, reference, range(6, STEPS + 1))
    assert result["one_copy"] == [True, True]
    gradients = result["gradients"]
    assert gradients["built"] == gradients["after_fit"] == 0
    assert gradients["before_steps"] == [gradients["partition"]] * (STEPS - 5)

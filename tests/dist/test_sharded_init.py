"""Sharded initialization: built on ``meta``, split and sharded, then each rank materializes only its part.

Two gloo ranks build the Trainer on a ``meta`` model (what ``llmray pretrain`` does) for FSDP2
dp=2, tp=2, pp=2 and ZeRO-3 dp=2. The model is wide enough that its parameters span several
init blocks and FSDP/TP shards cut through blocks. Checked on every rank:

* when a part is materialized it is still entirely on ``meta``, and under FSDP2 / TP its
  parameters are already sharded (DTensors);
* while the Trainer is built under FSDP2 and TP, no tensor is created as large as the embedding:
  the embedding, the head and the MLP matrices (as large or larger) are never allocated whole;
* each rank's materialized parameter elements equal its shards' (FSDP2 / TP), and under pp=2 its
  stage's parameter count, the other stage's layers staying on ``meta``;
* the gathered weights equal ``llama.build(cfg, seed=SEED)`` in one process, bitwise;
* no all-gather runs while the Trainer is built: no rank assembles a whole parameter from shards
  (DeepSpeed's ZeRO-3 gathered every parameter once to register its gradient hooks).

Under ZeRO-3 each module is partitioned as soon as its parameters are filled: the most
parameter elements ever whole on a rank at once are one module's (never the model's), and each
rank keeps half of every parameter.

Starting from pretrained weights (SFT, DPO, RL: an HF-layout directory), each rank reads only its
part from the file: what :class:`~llmray.model.hf.WeightSlices` hands out on a rank adds up to
what the rank holds, no single read is a whole parameter under FSDP2 / TP, and the gathered
weights equal the file's.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llmray.model import hf, llama, param_init
from llmray.model.config import preset
from llmray.parallel import ParallelConfig
from llmray.parallel.pipeline import PipelineScheduleConfig
from llmray.train.objectives import CausalLM
from llmray.train.trainer import TrainConfig, Trainer

SEED = 1234
PRETRAINED_SEED = 99
SHAPE = dict(vocab_size=257, dim=128, n_heads=4, n_kv_heads=2, ffn_hidden_dim=384, n_layers=4, max_seq_len=64,
             tie_embeddings=False)
# pretrained starts on FSDP2 besides the plain shape: tied embeddings (the presets' default) and a
# one-row score head (a reward model), whose second FSDP2 shard is empty
VARIANTS = {"tied": {"tie_embeddings": True}, "score_head": {"head": "score"}}
LAYOUTS = {
    "fsdp2_dp2": ParallelConfig(),
    "tp2": ParallelConfig(tp=2),
    "pp2": ParallelConfig(pp=2, pipeline=PipelineScheduleConfig(schedule="1f1b", microbatches=2)),
    "zero3_dp2": ParallelConfig(strategy="deepspeed", zero_stage=3),
}


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class WatchTensors(TorchDispatchMode):
    """While active: the most elements of any non-meta tensor an operator returns (of a DTensor:
    its local shard, what the rank allocates), and how many all-gathers ran (each assembles a
    whole tensor from the ranks' shards)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.all_gathers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.all_gathers += "allgather" in func.name()
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.largest = max(self.largest, local(leaf).numel())
        return out


def ranks_main(_shards, out):
    cfg = preset("tiny", **SHAPE)
    results = {}
    for variant in VARIANTS:
        results[f"fsdp2_dp2-{variant}/pretrained"] = from_pretrained(variant_config(variant), f"fsdp2_dp2-{variant}",
                                                                     LAYOUTS["fsdp2_dp2"], out, weights=variant)
    for name, parallel in LAYOUTS.items():
        results[f"{name}/pretrained"] = from_pretrained(cfg, name, parallel, out)
        parts_seen, whole_at_once = [], []
        materialize = param_init.materialize

        def watched(module, *args, **kwargs):
            params = list(module.parameters())
            parts_seen.append({"all_meta": all(p.device.type == "meta" for p in params),
                               "sharded": all(isinstance(p, DTensor) for p in params)})
            if "each" in kwargs:  # ZeRO-3: count the whole (not yet partitioned) elements at each step
                each = kwargs["each"]

                def counted(submodule):
                    whole_at_once.append(sum(p.numel() for p in params
                                             if p.device.type != "meta" and not hasattr(p, "ds_id")))
                    each(submodule)
                kwargs["each"] = counted
            return materialize(module, *args, **kwargs)
        param_init.materialize = watched
        model = llama.build(cfg, "meta")
        try:
            with WatchTensors() as watched_build:
                trainer = Trainer(TrainConfig(steps=1, seed=SEED, precision="fp32"), model, CausalLM(), iter(()),
                                  parallel=parallel, device=torch.device("cpu"))
        finally:
            param_init.materialize = materialize
        on_device = [p for p in model.parameters() if p.device.type != "meta"]
        results[name] = {"parts": parts_seen, "largest_created": watched_build.largest,
                         "all_gathers": watched_build.all_gathers,
                         "whole_at_once": max(whole_at_once, default=None),
                         "partition_elements": sum(p.ds_tensor.numel() for p in model.parameters()
                                                   if hasattr(p, "ds_tensor")),
                         "materialized_elements": sum(local(p).numel() for p in on_device),
                         "meta_elements": sum(p.numel() for p in model.parameters() if p.device.type == "meta"),
                         "stage_elements": sum(p.numel() for m in getattr(trainer.engine, "modules", [])
                                               for p in m.parameters())}
        weights = gathered_weights(trainer)
        if dist.get_rank() == 0:
            torch.save(weights, out / f"{name}.pt")
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, results)
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(everything))


def variant_config(variant: str):
    return preset("tiny", **{**SHAPE, **VARIANTS[variant]})


def from_pretrained(cfg, layout: str, parallel: ParallelConfig, out, weights: str = "plain") -> dict:
    """Build the Trainer on ``meta`` filled from an HF export of another seed; the reads it made."""
    directory = out / f"pretrained-{weights}"
    if dist.get_rank() == 0 and not directory.exists():
        hf.export(directory, cfg, llama.build(cfg, seed=PRETRAINED_SEED).state_dict())
    dist.barrier()
    source = hf.WeightSlices(directory, cfg)
    reads = []

    def counted(name, *where):
        values = source(name, *where)
        reads.append(values.numel())
        return values
    model = llama.build(cfg, "meta")
    trainer = Trainer(TrainConfig(steps=1, seed=SEED, precision="fp32"), model, CausalLM(), iter(()),
                      parallel=parallel, device=torch.device("cpu"), init=counted)
    weights = gathered_weights(trainer)
    if dist.get_rank() == 0:
        torch.save(weights, out / f"{layout}-pretrained.pt")
    return {"largest_read": max(reads), "read_elements": sum(reads),
            "held_elements": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else local(p).numel()
                                 for p in model.parameters() if p.device.type != "meta")}


def gathered_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Full weights under their plain names (pipeline stages: each rank's stage, merged)."""
    if not hasattr(trainer.engine, "modules"):
        return trainer.export_weights()
    mine = {param_init.canonical_name(n): p.detach().clone() for m in trainer.engine.modules
            for n, p in m.state_dict().items()}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    from tests.dist import parallel_support as ps

    out = ps.spawn_runs(tmp_path_factory, "sharded_init", 2, ranks_main, shards)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def single_process():
    return llama.build(preset("tiny", **SHAPE), seed=SEED).state_dict()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gathered_initial_weights_equal_the_single_process_init_bitwise(runs, single_process, layout):
    out, _ = runs
    gathered = torch.load(out / f"{layout}.pt", weights_only=True)
    assert sorted(gathered) == sorted(single_process)
    for name, tensor in single_process.items():
        assert torch.equal(gathered[name], tensor), name


@pytest.mark.parametrize("layout", ["fsdp2_dp2", "tp2"])
def test_parts_are_sharded_on_meta_before_any_full_parameter_exists(runs, single_process, layout):
    _, results = runs
    total = sum(t.numel() for t in single_process.values())
    embedding = single_process["tok_embeddings.weight"].numel()
    per_rank = [rank[layout] for rank in results]
    for rank in per_rank:
        assert rank["parts"] == [{"all_meta": True, "sharded": True}]
        assert rank["largest_created"] < embedding
        assert rank["meta_elements"] == 0
    if layout == "fsdp2_dp2":  # every parameter split in two
        assert sum(rank["materialized_elements"] for rank in per_rank) == total
    else:  # TP shards the matrices; norms (2 per layer + final, 128 each) are replicated on both ranks
        replicated = (2 * SHAPE["n_layers"] + 1) * SHAPE["dim"]
        assert sum(rank["materialized_elements"] for rank in per_rank) == total + replicated


def test_zero3_partitions_each_module_as_it_is_filled_and_never_holds_the_model_whole(runs, single_process):
    _, results = runs
    total = sum(t.numel() for t in single_process.values())
    largest_module = max(SHAPE["dim"] * SHAPE["ffn_hidden_dim"], SHAPE["vocab_size"] * SHAPE["dim"])
    for rank in (r["zero3_dp2"] for r in results):
        assert rank["parts"] == [{"all_meta": True, "sharded": False}]
        assert rank["whole_at_once"] == largest_module < total / 10
        # every parameter split in two, each half padded to an even count at most
        assert total / 2 <= rank["partition_elements"] <= total / 2 + len(single_process)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_no_rank_gathers_a_parameter_while_the_trainer_is_built(runs, layout):
    _, results = runs
    assert [rank[layout]["all_gathers"] for rank in results] == [0, 0]


def test_pipeline_ranks_hold_only_their_stage(runs, single_process):
    _, results = runs
    per_rank = [rank["pp2"] for rank in results]
    for rank in per_rank:
        assert rank["parts"] == [{"all_meta": True, "sharded": False}]
        assert rank["materialized_elements"] == rank["stage_elements"]
        assert 0 < rank["stage_elements"] < sum(t.numel() for t in single_process.values())
    assert sum(rank["stage_elements"] for rank in per_rank) == sum(t.numel() for t in single_process.values())


@pytest.mark.parametrize("layout", ["fsdp2_dp2", "tp2", "pp2"])
def test_the_memory_planner_counts_what_each_rank_holds(runs, layout):
    """``llmray plan``'s parameters per rank against the elements the ranks materialized."""
    from llmray.train import memory_plan

    _, results = runs
    plans = memory_plan.plan(preset("tiny", **SHAPE), LAYOUTS[layout], 2, seq_len=32, micro_batch_size=2,
                             compute_bytes=4)
    held = [rank[layout]["materialized_elements"] for rank in results]
    if layout == "pp2":  # one plan per stage
        assert [p.params for p in plans] == held
    elif layout == "tp2":  # the larger rank's share (the vocabulary of 257 rows splits 129 / 128)
        assert plans[0].params == max(held)
    else:  # the planner rounds the total, FSDP2 each parameter
        assert abs(plans[0].params - max(held)) / max(held) < 0.01


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_sharded_run_reads_only_its_part_of_the_pretrained_weights(runs, layout):
    out, results = runs
    cfg = preset("tiny", **SHAPE)
    expected = llama.build(cfg, seed=PRETRAINED_SEED).state_dict()
    gathered = torch.load(out / f"{layout}-pretrained.pt", weights_only=True)
    assert sorted(gathered) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor), name
    total = sum(t.numel() for t in expected.values())
    for rank in (r[f"{layout}/pretrained"] for r in results):
        if layout == "zero3_dp2":  # one module read whole at a time, then partitioned: half kept
            assert rank["read_elements"] == total
            assert rank["held_elements"] <= total / 2 + len(expected)
        else:  # FSDP2 / TP: the rank's shards only; pp: its stage only
            assert rank["read_elements"] == rank["held_elements"] < total
        if layout in ("fsdp2_dp2", "tp2"):
            assert rank["largest_read"] < expected["tok_embeddings.weight"].numel()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_reads_tied_embeddings_and_a_one_row_head_from_pretrained_weights(runs, variant):
    out, results = runs
    expected = llama.build(variant_config(variant), seed=PRETRAINED_SEED).state_dict()
    gathered = torch.load(out / f"fsdp2_dp2-{variant}-pretrained.pt", weights_only=True)
    assert sorted(gathered) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor), name
    for rank in (r[f"fsdp2_dp2-{variant}/pretrained"] for r in results):
        assert rank["read_elements"] == rank["held_elements"]

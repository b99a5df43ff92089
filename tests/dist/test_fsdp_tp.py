"""FSDP2 × tensor parallelism (2-D mesh dp_shard=2 × tp=2) on 4 gloo ranks, through the real Trainer.

Each data-parallel pair of ranks reads half of the global batch of 4 rows; within a pair the
two tensor-parallel ranks read the same rows. Parameters are 2-D DTensors (Shard(0) over dp,
the TP placement over tp); the layouts run with AdamW and one with Muon. Tolerance as in ``test_tp.py``: losses within 1e-5 relative of one
process for 10 steps, parameters within 5e-5 absolute. The 2-D checkpoint resumes with tp=1 in
one process.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from llmray.parallel import ParallelConfig
from llmray.train.checkpoint import LocalCheckpointStore, step_dir_name
from llmray.train.trainer import OptimizerConfig
from tests.dist import parallel_support as ps
from tests.dist.test_tp import ATOL_PARAMS, RTOL, STEPS


# Muon orthogonalizes whole matrices: on this mesh each is sharded both ways (Shard(0) over dp,
# the TP placement over tp), so the test shows the gather / local-slice path equals one process.
MUON = OptimizerConfig(kind="muon", lr=ps.LR)
LAYOUTS = {"fsdp2_tp": (ParallelConfig(tp=2), None),
           "hsdp_tp_sp": (ParallelConfig(tp=2, dp_replicate=2, sequence_parallel=True), None),
           "fsdp2_tp_muon": (ParallelConfig(tp=2), MUON)}


def ranks_main(shards, out):
    results = {}
    for name, (parallel, optimizer) in LAYOUTS.items():
        store = LocalCheckpointStore(out / f"ckpt_{name}")
        trainer = ps.trainer(shards, parallel, steps=STEPS, store=store, checkpoint_every=5, optimizer=optimizer)
        result = trainer.fit()
        params = trainer.export_weights()
        if dist.get_rank() == 0:
            results[name] = [result.losses[s] for s in range(1, STEPS + 1)]
            torch.save(params, out / f"{name}_params.pt")
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def parallel_runs(shards, tmp_path_factory):
    return ps.spawn_runs(tmp_path_factory, "fsdp_tp", 4, ranks_main, shards)


@pytest.fixture(scope="module")
def references(shards):
    return {None: ps.trainer_reference(shards, STEPS), MUON.kind: ps.trainer_reference(shards, STEPS, MUON)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_2d_matches_single_process(parallel_runs, references, layout):
    optimizer = LAYOUTS[layout][1]
    reference = references[optimizer and optimizer.kind]
    losses = json.loads((parallel_runs / "results.json").read_text())[layout]
    assert ps.max_relative_error(losses, reference["losses"]) < RTOL
    params = torch.load(parallel_runs / f"{layout}_params.pt", weights_only=True)
    errors = {k: float((params[k] - v).abs().max()) for k, v in reference["params"].items()}
    assert max(errors.values()) < ATOL_PARAMS, sorted(errors.items(), key=lambda item: -item[1])[:3]


@pytest.mark.parametrize("layout", ["fsdp2_tp", "fsdp2_tp_muon"])
def test_2d_checkpoint_resumes_in_one_process(parallel_runs, references, shards, tmp_path, layout):
    """The checkpoint (Muon's momentum buffers too) reshards from the 2-D mesh to one process."""
    optimizer = LAYOUTS[layout][1]
    trainer = ps.trainer(shards, ParallelConfig(strategy="none"), steps=STEPS,
                         store=LocalCheckpointStore(tmp_path / "resume"), optimizer=optimizer)
    result = trainer.fit(resume_from=parallel_runs / f"ckpt_{layout}" / step_dir_name(5))
    losses = [result.losses[s] for s in range(6, STEPS + 1)]
    assert ps.max_relative_error(losses, references[optimizer and optimizer.kind]["losses"][5:]) < RTOL

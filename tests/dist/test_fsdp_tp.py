"""FSDP2 × tensor parallelism (2-D mesh dp_shard=2 × tp=2) on 4 gloo ranks, through the real Trainer.

Each data-parallel pair of ranks reads half of the global batch of 4 rows; within a pair the
two tensor-parallel ranks read the same rows. Parameters are 2-D DTensors (Shard(0) over dp,
the TP placement over tp). Tolerance as in ``test_tp.py``: losses within 1e-5 relative of one
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
from tests.dist import parallel_support as ps
from tests.dist.test_tp import ATOL_PARAMS, RTOL, STEPS


LAYOUTS = {"fsdp2_tp": ParallelConfig(tp=2), "hsdp_tp_sp": ParallelConfig(tp=2, dp_replicate=2,
                                                                          sequence_parallel=True)}


def ranks_main(shards, out):
    results = {}
    for name, parallel in LAYOUTS.items():
        store = LocalCheckpointStore(out / f"ckpt_{name}")
        trainer = ps.trainer(shards, parallel, steps=STEPS, store=store, checkpoint_every=5)
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
def reference(shards):
    return ps.trainer_reference(shards, STEPS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_2d_matches_single_process(parallel_runs, reference, layout):
    losses = json.loads((parallel_runs / "results.json").read_text())[layout]
    assert ps.max_relative_error(losses, reference["losses"]) < RTOL
    params = torch.load(parallel_runs / f"{layout}_params.pt", weights_only=True)
    errors = {k: float((params[k] - v).abs().max()) for k, v in reference["params"].items()}
    assert max(errors.values()) < ATOL_PARAMS, sorted(errors.items(), key=lambda item: -item[1])[:3]


def test_2d_checkpoint_resumes_in_one_process(parallel_runs, reference, shards, tmp_path):
    trainer = ps.trainer(shards, ParallelConfig(strategy="none"), steps=STEPS,
                         store=LocalCheckpointStore(tmp_path / "resume"))
    result = trainer.fit(resume_from=parallel_runs / "ckpt_fsdp2_tp" / step_dir_name(5))
    losses = [result.losses[s] for s in range(6, STEPS + 1)]
    assert ps.max_relative_error(losses, reference["losses"][5:]) < RTOL

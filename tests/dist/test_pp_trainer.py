"""Pipeline parallelism driven by the real Trainer (the loop ``llmray pretrain`` runs), against one process.

Two gloo ranks, pp=2 (4 layers, untied head, 1F1B and interleaved 1F1B with 2 virtual stages
per rank), 4 pipeline micro-batches per step. Both ranks read the same rows (the loader is
sharded by the data-parallel coordinate, and dp=1 here). Checked against the same Trainer in
one process: per-step losses, the validation loss and bits per byte (computed on the last
stage through the schedule's forward-only pass), within 1e-5 relative; the pp=2 checkpoint
(flattened optimizer state under global names) resumes in one process with pp=1 and continues
with the same losses.
"""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from llmray.parallel import ParallelConfig
from llmray.parallel.pipeline import PipelineScheduleConfig
from llmray.train.checkpoint import LocalCheckpointStore, step_dir_name
from tests.dist import parallel_support as ps
from tests.dist.test_tp import RTOL, STEPS


MODEL = dict(n_layers=4, tie_embeddings=False)
LAYOUTS = {
    "pp_1f1b": ParallelConfig(pp=2, pipeline=PipelineScheduleConfig(schedule="1f1b", microbatches=4)),
    "pp_interleaved": ParallelConfig(pp=2, pipeline=PipelineScheduleConfig(schedule="interleaved_1f1b",
                                                                           microbatches=4, virtual_stages=2)),
}


def ranks_main(shards, out):
    results = {}
    for name, parallel in LAYOUTS.items():
        trainer = ps.trainer(shards, parallel, steps=STEPS, store=LocalCheckpointStore(out / f"ckpt_{name}"),
                             checkpoint_every=5, **MODEL)
        result = trainer.fit()
        results[name] = {"losses": [result.losses[s] for s in range(1, STEPS + 1)], "evals": result.evals,
                         "tokens": [r.tokens for r in result.records]}
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def parallel_runs(shards, tmp_path_factory):
    return ps.spawn_runs(tmp_path_factory, "pp_trainer", 2, ranks_main, shards)


@pytest.fixture(scope="module")
def reference(shards):
    return ps.trainer_reference(shards, STEPS, **MODEL)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_pipeline_matches_single_process(parallel_runs, reference, layout):
    result = json.loads((parallel_runs / "results.json").read_text())[layout]
    assert ps.max_relative_error(result["losses"], reference["losses"]) < RTOL
    assert result["tokens"] == reference["tokens"]  # each batch counted once, not once per stage
    assert [e["step"] for e in result["evals"]] == [e["step"] for e in reference["evals"]]
    for key in ("val_loss", "val_bpb"):
        assert ps.max_relative_error([e[key] for e in result["evals"]], [e[key] for e in reference["evals"]]) < RTOL


def test_pp2_checkpoint_resumes_with_pp1(parallel_runs, reference, shards, tmp_path):
    trainer = ps.trainer(shards, ParallelConfig(strategy="none"), steps=STEPS,
                         store=LocalCheckpointStore(tmp_path / "resume"), **MODEL)
    result = trainer.fit(resume_from=parallel_runs / "ckpt_pp_1f1b" / step_dir_name(5))
    losses = [result.losses[s] for s in range(6, STEPS + 1)]
    assert ps.max_relative_error(losses, reference["losses"][5:]) < RTOL

"""Pipeline parallelism composed with FSDP2 and with TP on 4 gloo ranks, against one process.

Layouts (mesh pp × dp_shard × tp): ``pp_dp`` = 2 × 2 × 1 (each pipeline stage FSDP2-sharded over
2 ranks, each data-parallel replica reading half of the batch of 4 rows) and ``pp_tp`` = 2 × 1 × 2
(each stage tensor-parallel). Both run 1F1B with 2 micro-batches per replica; each stage is
parallelized by :func:`~llmray.parallel.compose.parallelize_part` (TP → AC → compile → FSDP).
Tolerance as in ``test_pp.py``: losses and gradient norms within 1e-5 relative, parameters
within 5e-5 absolute after 10 AdamW steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmray.parallel.compose import Layout, parallelize_part
from llmray.parallel.mesh import ParallelDims
from llmray.parallel.pipeline import PipelineScheduleConfig, PipelineEngine, stage_modules
from tests.dist import parallel_support as ps
from tests.dist.test_pp import ATOL_PARAMS, BATCH, RTOL, STEPS, model
from tests.train_support import spawn_gloo

LAYOUTS = {"pp_dp": dict(pp=2, tp=1), "pp_tp": dict(pp=2, tp=2)}
PIPELINE = PipelineScheduleConfig(schedule="1f1b", microbatches=2)


def train(dims: ParallelDims, out, name):
    mesh = dims.build_mesh("cpu")
    coords = dims.coordinates(dist.get_rank())
    parts = stage_modules(model(), coords["pp"], dims.pp, PIPELINE)
    layout = Layout(dims, mesh)
    for _, module in parts:
        parallelize_part(module, layout, param_dtype=None)
    engine = PipelineEngine(parts, ps.make_optimizer, mesh["pp"], PIPELINE, ps.summed_loss, torch.device("cpu"))
    rows = BATCH // dims.dp
    losses, norms = [], []
    for batch in ps.text_batches(STEPS, BATCH):
        weight = batch[:, 1:].numel()
        mine = batch[coords["dp"] * rows:(coords["dp"] + 1) * rows]
        loss_sum = engine.forward_backward(mine[:, :-1], mine[:, 1:], dims.dp / weight)  # FSDP averages over dp
        losses.append(ps.all_reduce_sum(loss_sum, mesh["dp"].get_group()) / weight)
        norms.append(engine.clip_grad_norm(ps.GRAD_CLIP))
        engine.step()
    params = ps.full_params(engine.modules)
    if coords["dp"] == 0 and coords["tp"] == 0:
        torch.save(params, out / f"{name}_pp{coords['pp']}.pt")
    return {"losses": losses, "grad_norms": norms}


def ranks_main(out):
    results = {name: train(ParallelDims.resolve(4, **degrees), out, name) for name, degrees in LAYOUTS.items()}
    if dist.get_rank() == 0:
        ps.write_results(out / "results.json", results)


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("3d")
    spawn_gloo(4, ranks_main, out)
    return out


@pytest.fixture(scope="module")
def reference():
    return ps.reference(model(), ps.text_batches(STEPS, BATCH))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_composed_matches_single_process(parallel_runs, reference, layout):
    result = ps.read_results(parallel_runs / "results.json")[layout]
    assert ps.max_relative_error(result["losses"], reference["losses"]) < RTOL
    assert ps.max_relative_error(result["grad_norms"], reference["grad_norms"]) < RTOL
    params = {}
    for stage in range(2):
        params.update(torch.load(parallel_runs / f"{layout}_pp{stage}.pt", weights_only=True))
    assert params.keys() == reference["params"].keys()
    errors = {k: float((params[k] - v).abs().max()) for k, v in reference["params"].items()}
    assert max(errors.values()) < ATOL_PARAMS, sorted(errors.items(), key=lambda item: -item[1])[:3]

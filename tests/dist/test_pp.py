"""Pipeline parallelism on 2 gloo ranks against one process: every schedule, and pp=2 → pp=1 checkpoints.

The model is the tiny preset with 4 layers (untied head), split into 2 stages (or 4 virtual
stages, 2 per rank, for the interleaved schedules); each step's batch of 4 rows is cut into 4
pipeline micro-batches. Tolerance: losses and gradient norms within 1e-5 relative of the
one-process run for 10 steps, parameters after them within 5e-5 absolute (fp32; only the order
of floating-point reductions differs: per-micro-batch gradient sums, stage-wise norms).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmray.parallel.mesh import ParallelDims
from llmray.parallel import state
from llmray.parallel.pipeline import PipelineScheduleConfig, PipelineEngine, stage_modules
from tests.dist import parallel_support as ps
from tests.train_support import spawn_gloo

STEPS = 10
CHECKPOINT_STEP = 5
RTOL = 1e-5
ATOL_PARAMS = 5e-5  # Adam (lr 3e-3) turns 1e-7 gradient differences into ~1e-5 weight differences
LAYERS = 4
BATCH = 4
SCHEDULES = {
    "gpipe": PipelineScheduleConfig(schedule="gpipe", microbatches=4),
    "1f1b": PipelineScheduleConfig(schedule="1f1b", microbatches=4),
    "interleaved_1f1b": PipelineScheduleConfig(schedule="interleaved_1f1b", microbatches=4, virtual_stages=2),
    "interleaved_zero_bubble": PipelineScheduleConfig(schedule="interleaved_zero_bubble", microbatches=4,
                                                      virtual_stages=2),
}


def model():
    return ps.tiny(n_layers=LAYERS, tie_embeddings=False)


def train_pipelined(cfg: PipelineScheduleConfig, mesh, batches, out, name):
    parts = stage_modules(model(), mesh["pp"].get_local_rank(), mesh["pp"].size(), cfg)
    engine = PipelineEngine(parts, ps.make_optimizer, mesh["pp"], cfg, ps.summed_loss, torch.device("cpu"))
    losses, norms = [], []
    for batch in batches:
        weight = batch[:, 1:].numel()
        losses.append(float(engine.forward_backward(batch[:, :-1], batch[:, 1:], 1.0 / weight)) / weight)
        norms.append(engine.clip_grad_norm(ps.GRAD_CLIP))
        engine.step()
    torch.save(ps.full_params(engine.modules), out / f"{name}_rank{dist.get_rank()}.pt")
    return engine, {"losses": losses, "grad_norms": norms}


def ranks_main(out):
    mesh = ParallelDims.resolve(2, pp=2).build_mesh("cpu")
    batches = ps.text_batches(STEPS, BATCH)
    results = {}
    for name, cfg in SCHEDULES.items():
        _, results[name] = train_pipelined(cfg, mesh, batches, out, name)
    engine, _ = train_pipelined(SCHEDULES["1f1b"], mesh, batches[:CHECKPOINT_STEP], out, "checkpointed")
    engine.save(out / "checkpoint")
    if dist.get_rank() == 0:
        ps.write_results(out / "results.json", results)


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp")
    spawn_gloo(2, ranks_main, out)
    return out


@pytest.fixture(scope="module")
def reference():
    return ps.reference(model(), ps.text_batches(STEPS, BATCH))


def stage_params(out, name):
    merged = {}
    for rank in range(2):
        merged.update(torch.load(out / f"{name}_rank{rank}.pt", weights_only=True))
    return merged


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_matches_single_process(pipelined, reference, schedule):
    result = ps.read_results(pipelined / "results.json")[schedule]
    assert ps.max_relative_error(result["losses"], reference["losses"]) < RTOL
    assert ps.max_relative_error(result["grad_norms"], reference["grad_norms"]) < RTOL
    params = stage_params(pipelined, schedule)
    assert params.keys() == reference["params"].keys()  # stages together hold every global name once
    errors = {name: float((params[name] - value).abs().max()) for name, value in reference["params"].items()}
    assert max(errors.values()) < ATOL_PARAMS, sorted(errors.items(), key=lambda item: -item[1])[:3]


def test_pp2_checkpoint_restores_with_pp1(pipelined, reference):
    """Model and optimizer saved by 2 stages load into the whole model; steps 6..10 match the reference."""
    whole = ps.tiny(seed=123, n_layers=LAYERS, tie_embeddings=False)  # different init: all comes from the file
    optimizer = ps.make_optimizer(whole)
    state.load([whole], [optimizer], pipelined / "checkpoint")
    assert optimizer.state  # Adam moments were restored, not re-initialised
    losses = []
    for batch in ps.text_batches(STEPS - CHECKPOINT_STEP, BATCH, offset=CHECKPOINT_STEP):
        loss_sum = ps.summed_loss(whole(batch[:, :-1]), batch[:, 1:])
        (loss_sum / batch[:, 1:].numel()).backward()
        torch.nn.utils.clip_grad_norm_(whole.parameters(), ps.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / batch[:, 1:].numel())
    assert ps.max_relative_error(losses, reference["losses"][CHECKPOINT_STEP:]) < RTOL

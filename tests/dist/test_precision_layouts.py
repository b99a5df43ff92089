"""``precision: bf16`` on the layouts that do not cast parameters themselves (TP-only, PP-only), and
on ZeRO-3 started from ``meta``.

Two gloo ranks train the tiny model 50 steps with tp=2 and with pp=2 (4 layers, 1F1B). On every
rank the first Linear of the rank's part computes in bf16 (its output dtype; under autocast its
fp32 input is cast inside the op), parameters stay fp32, and the step-50 loss is within 2% of
the one-process fp32 run's. Before bf16 reached these layouts they trained in fp32 silently.

ZeRO-3 in bf16 (DeepSpeed's bf16 mode) partitions each module in bf16 as it is initialized on a
``meta`` model: its parameter partitions are bf16, its master partitions fp32, the first Linear
computes in bf16, and the loss tracks the one-process fp32 run from the same ``meta`` start.
"""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from llmray.parallel import ParallelConfig
from llmray.parallel.pipeline import PipelineScheduleConfig
from tests.dist import parallel_support as ps
from tests.unit.test_precision import LOSS_RTOL, STEPS, record_first_linear

PP_MODEL = dict(n_layers=4, tie_embeddings=False)
LAYOUTS = {"tp": (ParallelConfig(tp=2), {}),
           "pp": (ParallelConfig(pp=2, pipeline=PipelineScheduleConfig(schedule="1f1b", microbatches=4)), PP_MODEL),
           "zero3": (ParallelConfig(strategy="deepspeed", zero_stage=3), {"on_meta": True})}


def ranks_main(shards, out):
    results = {}
    for name, (parallel, model) in LAYOUTS.items():
        trainer = ps.trainer(shards, parallel, steps=STEPS, precision="bf16", **model)
        modules = getattr(trainer.engine, "modules", None) or [trainer.engine.model]
        seen = [record_first_linear(module) for module in modules]  # filled as it trains
        result = trainer.fit()
        param_dtypes = {str(getattr(p, "ds_tensor", p).dtype) for module in modules for p in module.parameters()}
        masters = getattr(getattr(trainer.engine, "optimizer", None), "fp32_partitioned_groups_flat", [])  # ZeRO-3
        param_dtypes |= {f"master {m.dtype}" for m in masters}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"seen": sorted({str(d) for dtypes in seen for d in dtypes}), "params": sorted(param_dtypes)})
        if dist.get_rank() == 0:
            results[name] = {"loss": result.losses[STEPS], "ranks": gathered}
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def parallel_runs(shards, tmp_path_factory):
    return json.loads((ps.spawn_runs(tmp_path_factory, "precision", 2, ranks_main, shards) / "results.json").read_text())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_on_tp_only_pp_only_and_zero3(parallel_runs, shards, layout):
    result = parallel_runs[layout]
    params = ["master torch.float32", "torch.bfloat16"] if layout == "zero3" else ["torch.float32"]
    assert result["ranks"] == [{"seen": ["torch.bfloat16"], "params": params}] * 2
    fp32 = ps.trainer_reference(shards, STEPS, precision="fp32", **LAYOUTS[layout][1])["losses"][-1]
    assert abs(result["loss"] - fp32) / fp32 < LOSS_RTOL, (result["loss"], fp32)

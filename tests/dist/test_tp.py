"""Tensor (and sequence) parallelism on 2 gloo ranks, through the real Trainer, against one process.

The tiny model (4 query heads, 2 key/value heads: one kv head per rank; tied embedding/head
vocabulary-parallel) trains 10 steps with tp=2, with and without sequence parallelism, and with
the GPT-2-style blocks of the baseline recipe (GELU MLP without w3, LayerNorm with bias).
Tolerance: per-step losses (and the final validation loss) within 1e-5 relative of the
one-process run (fp32; only reduction order differs); parameters after 10 AdamW steps within
5e-5 absolute (Adam turns 1e-7 gradient differences into ~1e-5 weight differences).
A tp=2 checkpoint (DCP of DTensor shards) resumes in one process and continues within the same
tolerance. Loss parallelism (cross-entropy on vocabulary-sharded logits, no logits all-gather)
is checked on its own loop, since the trainer's objectives take full logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmray.parallel import ParallelConfig
from llmray.parallel.mesh import ParallelDims
from llmray.parallel.tensor import apply_tensor_parallel, loss_context
from llmray.train.checkpoint import LocalCheckpointStore, step_dir_name
from tests.dist import parallel_support as ps

STEPS = 10
RTOL = 1e-5
ATOL_PARAMS = 5e-5
GPT2_STYLE = {"mlp": "gelu", "norm": "layernorm", "ffn_hidden_dim": None}  # the baseline recipe's blocks
LAYOUTS = {"tp": (ParallelConfig(tp=2), {}), "tp_sp": (ParallelConfig(tp=2, sequence_parallel=True), {}),
           "tp_gpt2_style": (ParallelConfig(tp=2), GPT2_STYLE)}


def ranks_main(shards, out):
    results = {}
    for name, (parallel, overrides) in LAYOUTS.items():
        store = LocalCheckpointStore(out / f"ckpt_{name}")
        trainer = ps.trainer(shards, parallel, steps=STEPS, store=store, checkpoint_every=5, **overrides)
        result = trainer.fit()
        params = trainer.export_weights()
        if dist.get_rank() == 0:
            results[name] = {"losses": [result.losses[s] for s in range(1, STEPS + 1)],
                             "val_loss": result.evals[-1]["val_loss"]}
            torch.save(params, out / f"{name}_params.pt")
    results["loss_parallel"] = train_loss_parallel()
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


def train_loss_parallel() -> dict:
    model = ps.tiny()
    apply_tensor_parallel(model, ParallelDims.resolve(2, tp=2).build_mesh("cpu")["tp"], sequence_parallel=True,
                          loss_parallel=True)
    optimizer = ps.make_optimizer(model)
    losses, norms = [], []
    for batch in ps.text_batches(STEPS, 4):
        with loss_context(True):
            logits = model(batch[:, :-1])  # (B, T, V) DTensor sharded on V
            loss_sum = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            (loss_sum / batch[:, 1:].numel()).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), ps.GRAD_CLIP).full_tensor()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.full_tensor()) / batch[:, 1:].numel())
    return {"losses": losses, "grad_norms": norms}


@pytest.fixture(scope="module")
def parallel_runs(shards, tmp_path_factory):
    return ps.spawn_runs(tmp_path_factory, "tp", 2, ranks_main, shards)


@pytest.fixture(scope="module")
def reference(shards):
    return ps.trainer_reference(shards, STEPS)


@pytest.fixture(scope="module")
def gpt2_style_reference(shards):
    return ps.trainer_reference(shards, STEPS, **GPT2_STYLE)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tensor_parallel_matches_single_process(parallel_runs, reference, gpt2_style_reference, layout):
    reference = gpt2_style_reference if LAYOUTS[layout][1] else reference
    result = json.loads((parallel_runs / "results.json").read_text())[layout]
    assert ps.max_relative_error(result["losses"], reference["losses"]) < RTOL
    assert ps.max_relative_error([result["val_loss"]], [reference["evals"][-1]["val_loss"]]) < RTOL
    params = torch.load(parallel_runs / f"{layout}_params.pt", weights_only=True)
    assert params.keys() == reference["params"].keys()
    errors = {k: float((params[k] - v).abs().max()) for k, v in reference["params"].items()}
    assert max(errors.values()) < ATOL_PARAMS, sorted(errors.items(), key=lambda item: -item[1])[:3]


def test_tp2_checkpoint_resumes_with_tp1(parallel_runs, reference, shards, tmp_path):
    """The step-5 checkpoint of the tp=2 run resumes in one process; steps 6..10 match the reference."""
    root = parallel_runs / "ckpt_tp"
    assert (root / step_dir_name(5) / ".metadata").is_file()
    store = LocalCheckpointStore(tmp_path / "resume")
    trainer = ps.trainer(shards, ParallelConfig(strategy="none"), steps=STEPS, store=store)
    result = trainer.fit(resume_from=root / step_dir_name(5))
    assert result.resumed_from.endswith(step_dir_name(5))
    losses = [result.losses[s] for s in range(6, STEPS + 1)]
    assert ps.max_relative_error(losses, reference["losses"][5:]) < RTOL


def test_loss_parallel_matches_single_process(parallel_runs):
    result = json.loads((parallel_runs / "results.json").read_text())["loss_parallel"]
    reference = ps.reference(ps.tiny(), ps.text_batches(STEPS, 4))
    assert ps.max_relative_error(result["losses"], reference["losses"]) < RTOL
    assert ps.max_relative_error(result["grad_norms"], reference["grad_norms"]) < RTOL

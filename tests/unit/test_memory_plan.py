"""The memory planner: ``llmray plan`` for the 8B and 70B presets without allocating, its accounting,
and ``llmray pretrain`` refusing a layout that cannot fit before it allocates anything.

The planner's parameter split is checked against what ranks really hold in
``tests/dist/test_sharded_init.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmray import cli
from llmray.model.config import preset
from llmray.parallel import ParallelConfig
from llmray.parallel.pipeline import PipelineScheduleConfig
from llmray.process_memory import peak_resident_mb
from llmray.train import memory_plan
from llmray.train.launch import FreshModel, TrainJob, train_worker
from llmray.train.objectives import CausalLM
from llmray.train.trainer import TrainConfig


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


@pytest.mark.parametrize("model", ["llama3-8b", "llama3-70b"])
def test_plan_prints_the_per_rank_table_of_a_big_preset_without_allocating_it(capsys, model):
    before = peak_resident_mb()
    code = cli.main(["plan", "--config", str(CONFIGS / "llama3-8b.yaml"), "--model", model, "--gpu-memory", "80GB"])
    out = capsys.readouterr().out
    assert code == 0, out
    header, row = out.splitlines()[1:3]
    assert header.split()[:8] == ["ranks", "params/rank", "parameters", "gathered", "gradients", "optimizer",
                                  "activations", "workspace"]
    expected = preset(model).num_params() / 64  # tp 8 x dp_shard 8: every parameter held once
    params_per_rank = float(row.split()[2].rstrip("M").replace(",", "")) * 1e6
    assert abs(params_per_rank / expected - 1) < 0.01
    assert row.split()[-1] == "yes"
    assert peak_resident_mb() - before < 500  # the 8B model alone is 32 GB in fp32


def test_a_layout_that_cannot_fit_is_refused_naming_the_largest_term(capsys):
    code = cli.main(["plan", "--config", str(CONFIGS / "gpu-1b.yaml"), "--model", "llama3-70b", "--gpu-memory", "80GB"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[2].split()[-1] == "NO"
    assert "does not fit on GPUs of 80GB" in captured.err and "the largest term is optimizer" in captured.err
    assert "shard further" in captured.err


def plans(parallel: ParallelConfig, world: int, **kwargs) -> list[memory_plan.RankPlan]:
    shape = dict(vocab_size=1000, dim=256, n_heads=4, n_kv_heads=2, ffn_hidden_dim=768, n_layers=4,
                 tie_embeddings=False)
    return memory_plan.plan(preset("tiny", **shape), parallel, world, seq_len=128, micro_batch_size=4,
                            compute_bytes=2, **kwargs)


def test_the_accounting_follows_the_layout():
    single = plans(ParallelConfig(strategy="none"), 1)[0]
    total = single.params
    assert single.terms["parameters"] == single.terms["gradients"] == 4 * total
    assert single.terms["optimizer"] == 8 * total and single.terms["gathered"] == 0
    # one micro-batch: gradients appear as backward frees activations; accumulated ones sit beside them
    assert single.total == sum(single.terms.values()) - min(single.terms["gradients"], single.terms["activations"])
    accumulating = plans(ParallelConfig(strategy="none"), 1, grad_accum=2)[0]
    assert accumulating.terms == single.terms and accumulating.total == sum(single.terms.values())
    fsdp = plans(ParallelConfig(), 4)[0]
    assert fsdp.params == -(-total // 4) and fsdp.terms["optimizer"] == 8 * fsdp.params
    assert fsdp.terms["gathered"] > 0  # blocks all-gathered to run
    zero1 = plans(ParallelConfig(strategy="deepspeed", zero_stage=1), 4)[0]
    assert zero1.params == total and zero1.terms["optimizer"] == -(-8 * total // 4)
    assert zero1.total == sum(zero1.terms.values())  # DeepSpeed's gradient buffers are allocated up front
    zero3 = plans(ParallelConfig(strategy="deepspeed", zero_stage=3), 4)[0]  # llmray's are allocated in backward
    assert zero3.total == sum(zero3.terms.values()) - min(zero3.terms["gradients"], zero3.terms["activations"])
    pp = plans(ParallelConfig(pp=2, pipeline=PipelineScheduleConfig(microbatches=2)), 2)
    assert sum(p.params for p in pp) == total and all(p.params < total for p in pp)
    assert all(p.total == sum(p.terms.values()) for p in pp)  # gradients accumulate over micro-batches
    muon = plans(ParallelConfig(strategy="none"), 1, optimizer="muon")[0]
    assert single.terms["optimizer"] / 2 < muon.terms["optimizer"] < single.terms["optimizer"]
    checkpointed = plans(ParallelConfig(strategy="none", activation_checkpointing=True), 1)[0]
    assert checkpointed.terms["activations"] < single.terms["activations"] / 2
    sp = plans(ParallelConfig(tp=2, sequence_parallel=True), 2)[0]
    assert sp.terms["activations"] < plans(ParallelConfig(tp=2), 2)[0].terms["activations"]


def test_pretraining_refuses_a_layout_that_cannot_fit_before_allocating(tmp_path):
    model = preset("llama3-8b")
    parallel = ParallelConfig(strategy="none")
    job = TrainJob(model=FreshModel(model), objective=CausalLM(), train_data=None,
                   train=TrainConfig(precision="fp32"), parallel=parallel,
                   execution=type("Execution", (), {"use_gpu": False})(), seq_len=512,
                   checkpoint_dir=str(tmp_path),
                   memory_plan=lambda **kw: memory_plan.plan(model, parallel, 1, seq_len=512, micro_batch_size=1,
                                                             **kw))
    before = peak_resident_mb()
    with pytest.raises(memory_plan.LayoutDoesNotFit, match="largest term is optimizer"):
        train_worker(job, store=None)
    assert peak_resident_mb() - before < 500


def test_sizes_parse_as_gpu_specs_write_them():
    assert memory_plan.parse_bytes("80GB") == 80 * 2 ** 30 == memory_plan.parse_bytes("80 GiB")
    assert memory_plan.parse_bytes("512MB") == 512 * 2 ** 20
    assert memory_plan.parse_bytes("1024") == 1024

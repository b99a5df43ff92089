"""SFT: the stage end to end in one process, and 2 FSDP2 workers on Ray Train equal 1 worker.

Tolerance of the equivalence: per-step losses within 1e-5 relative (fp32; only the order of
floating-point reductions differs between one process and two FSDP2 ranks).
"""

from __future__ import annotations

import json

import pytest

from llmray import config as config_lib
from llmray import stages
from llmray.align.conversations import SftSource, build_mixture
from llmray.align.packing import pack_conversations
from llmray.align.loader import RowData
from llmray.align.sft import SftConfig
from llmray.parallel import ParallelConfig
from llmray.train.launch import ExecutionConfig, PretrainedModel, TrainJob, launch
from llmray.train.objectives import MaskedLM
from llmray.train.schedule import ScheduleConfig
from llmray.train.trainer import OptimizerConfig, TrainConfig
from tests.align_support import export_tiny_model, template, tokenizer_dir

SFT_STAGE = stages.Stage("sft", "test", "llmray.align.sft:SftConfig", "llmray.align.sft:run_sft")
RTOL = 1e-5


def test_sft_stage_trains_exports_samples_and_quarantines(shared_data, tmp_path):
    bad = tmp_path / "user.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hi."},
                                            {"role": "assistant", "content": "Hi!"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": ""}]}) + "\n")
    cfg = config_lib.from_dict(SftConfig, {
        "model": str(export_tiny_model(tmp_path / "init", shared_data)),
        "tokenizer": str(tokenizer_dir(shared_data)), "batch": {"seq_len": 255, "micro_batch_size": 4},
        "val_fraction": 0.1,
        "sources": [{"kind": "oasst", "path": str(shared_data / "oasst1_en_100" / "en_100_tree.jsonl")},
                    {"kind": "gsm8k", "path": str(shared_data / "gsm8k" / "train.jsonl.gz"), "max_records": 60},
                    {"kind": "messages", "path": str(bad), "name": "user"}],
        "train": {"steps": 12, "log_every": 4, "eval_every": 6, "eval_batches": 2, "peak_flops": 1e11,
                  "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 2}},
        "samples": {"prompts": 2, "max_new_tokens": 8}})
    result = stages.run_stage(SFT_STAGE, cfg, tmp_path / "run")
    summary = result.manifest["summary"]
    assert summary["final_loss"] < summary["first_loss"] - 0.3
    assert summary["final_val_loss"] is not None and summary["quarantined"] == 1
    output = result.output
    quarantine = [json.loads(line) for line in (output / "quarantine.jsonl").read_text().splitlines()]
    assert quarantine == [{"path": str(bad), "offset": 2, "error": "empty_content",
                           "message": "messages[0].content (user) is empty"}]
    assert (output / "model" / "model.safetensors").is_file() and (output / "model" / "tokenizer.json").is_file()
    assert len((output / "samples.jsonl").read_text().splitlines()) == summary["samples"] == 2  # prompts asked for
    assert "Supervised fine-tuning" in (output / "report.md").read_text()
    data = json.loads((output / "data.json").read_text())
    assert data["counts"]["user"] == {"read": 1, "train": 1, "val": 0, "quarantined": 1}
    assert 0.5 < data["row_fill"] <= 1.0


def _job(init, tmp_path, name, batch_size, rows, parallel, execution):
    return TrainJob(model=PretrainedModel(str(init)), objective=MaskedLM(), train_data=RowData(rows, batch_size),
                    train=TrainConfig(steps=5, log_every=1, peak_flops=1e11, optimizer=OptimizerConfig(lr=3e-3),
                                      schedule=ScheduleConfig(warmup_steps=1)),
                    parallel=parallel, execution=execution, seq_len=rows.tokens.shape[1] - 1,
                    checkpoint_dir=str(tmp_path / name / "checkpoints"))


def test_two_fsdp2_workers_on_ray_train_match_one_worker(ray_session, shared_data, tmp_path):
    mixture = build_mixture([SftSource(kind="gsm8k", path=str(shared_data / "gsm8k" / "train.jsonl.gz"),
                                       max_records=80)], val_fraction=0.0)
    rows, _ = pack_conversations([c.messages for c in mixture.train], template(shared_data), seq_len=127, pad_id=2)
    init = export_tiny_model(tmp_path / "init", shared_data)
    one = launch(_job(init, tmp_path, "one", 4, rows, ParallelConfig(strategy="none"), ExecutionConfig()),
                 connect_ray=lambda: None).worker
    two = launch(_job(init, tmp_path, "two", 2, rows, ParallelConfig(strategy="fsdp2"),
                      ExecutionConfig(workers=2, cpus_per_worker=0.5)), connect_ray=lambda: None).worker
    assert sorted(one["losses"]) == sorted(two["losses"]) == [1, 2, 3, 4, 5]
    for step, loss in one["losses"].items():
        assert two["losses"][step] == pytest.approx(loss, rel=RTOL)
    assert one["losses"][5] < one["losses"][1]

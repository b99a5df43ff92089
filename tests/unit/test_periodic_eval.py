"""In-training evaluation without Ray: its schedule rule, and how finished evaluations become records."""

from __future__ import annotations

import pytest

from llmray import config as config_lib
from llmray.eval.tasks import TaskSpec
from llmray.train.metrics import format_evaluation
from llmray.train.periodic_eval import EvalCoordinator, TrainingEvalConfig
from llmray.train.pretrain import PretrainConfig

SECTION = {"every": 20, "task_specs": {"copa": {"format": "icl_mc", "path": "copa/copa.jsonl"}}}


def test_the_eval_section_must_fall_on_checkpoints():
    cfg = config_lib.from_dict(PretrainConfig, {"train": {"checkpoint_every": 10}, "eval": SECTION})
    assert cfg.eval.every == 20 and cfg.eval.selected_tasks() == ["copa"]
    with pytest.raises(ValueError, match=r"eval.every \(20\) must be a multiple of train.checkpoint_every \(15\)"):
        config_lib.from_dict(PretrainConfig, {"train": {"checkpoint_every": 15}, "eval": SECTION})
    with pytest.raises(ValueError, match="multiple of train.checkpoint_every"):
        config_lib.from_dict(PretrainConfig, {"eval": SECTION})  # checkpoint_every 0: only at the end


def test_finished_evaluations_become_step_records_and_their_weights_are_removed(tmp_path):
    cfg = TrainingEvalConfig(every=2, task_specs={"copa": TaskSpec(format="icl_mc", path="copa/copa.jsonl")})
    coordinator = EvalCoordinator(cfg, str(tmp_path / "evals"), chat=False)
    weights = tmp_path / "evals" / "weights" / "step_00000040"
    weights.mkdir(parents=True)
    coordinator.models["step_00000040"] = str(weights)
    records = coordinator._records({"step_00000040": {"copa/acc": 0.5, "core": -0.1}})
    assert records == [{"step": 40, "eval/copa/acc": 0.5, "eval/core": -0.1}] == coordinator.results()
    assert not weights.exists()
    assert format_evaluation(40, records[0]) == "step 40 eval | core -0.1000 | copa/acc 0.5000"

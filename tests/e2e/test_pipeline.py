"""`llmray pipeline` lineage on the demo's own config, `configs/pipeline/tiny.yaml`: a second run does
no work; changing one pretrain key re-runs pretrain and everything after it (SFT, DPO, eval) and
nothing before (classifier, curate, tokenizer, tokens), asserted from the manifests.

Every stage and its configuration come from the shipped file; only the amount of work is cut (fewer
files, examples, steps, prompts, a 2-layer model, pretraining in this process) so the eight stages
run in a few minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmray import config as config_lib
from llmray.pipeline import PipelineConfig, run_pipeline

pytestmark = pytest.mark.ray
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ORDER = ["classifier", "curate", "tokenizer", "tokens", "pretrain", "sft", "dpo", "eval"]
DOWNSTREAM_OF_PRETRAIN = ["pretrain", "sft", "dpo", "eval"]


def tiny_pipeline(pretrain_steps: int) -> PipelineConfig:
    return config_lib.from_dict(PipelineConfig, tiny_pipeline_raw(pretrain_steps))


def tiny_pipeline_raw(pretrain_steps: int) -> dict:
    """The shipped demo pipeline with the amount of work cut (see the module docstring)."""
    raw = config_lib.read_yaml(CONFIGS / "pipeline" / "tiny.yaml")
    stages = raw["stages"]
    assert list(stages) == ORDER
    for spec in stages["classifier"]["classifiers"]:
        spec.update(max_examples_per_class=200, epochs=2)
    for source in stages["curate"]["sources"]:
        source.update(max_files=2, max_docs_per_file=20)
    stages["tokenizer"].update(vocab_size=512, char_budget=100_000, report_chars=10_000)
    stages["tokens"].update(actors=1)
    pretrain = stages["pretrain"]
    pretrain["model"] = {**config_lib.read_yaml(CONFIGS / "model" / "tiny.yaml"), "vocab_size": 512}
    pretrain["batch"].update(seq_len=64, micro_batch_size=4)
    pretrain["train"].update(steps=pretrain_steps, log_every=2, eval_every=0, checkpoint_every=0)
    # lineage is the subject here, not the launcher (tests/ray/test_pretrain.py covers Ray Train):
    # one in-process worker saves two Ray Train start-ups
    pretrain["execution"] = {**pretrain.get("execution", {}), "workers": 1, "launcher": "process"}
    pretrain["parallel"] = {"strategy": "none"}
    for name in ("sft", "dpo"):
        stage = stages[name]
        stage.update(batch={"seq_len": 127, "micro_batch_size": 2}, samples={"prompts": 1, "max_new_tokens": 4})
        stage["train"].update(steps=2, log_every=1, eval_every=0, eval_batches=1)
        for source in stage["sources"]:
            source["max_records"] = 30
    stages["dpo"].update(metric_pairs=8, reference={**stages["dpo"]["reference"], "actors": 1})
    stages["eval"].update(limit=4, tasks=["arc_easy"], runner={**stages["eval"].get("runner", {}), "num_actors": 1})
    return raw


def manifests(run_root: Path) -> dict[str, dict]:
    return {stage: json.loads((run_root / stage / "manifest.json").read_text()) for stage in ORDER}


def test_second_run_is_cached_and_a_pretrain_change_reruns_only_downstream(ray_session, shared_data, tmp_path):
    runs_dir = tmp_path / "runs"
    first = run_pipeline(tiny_pipeline(pretrain_steps=4), runs_dir)
    assert [r.stage for r in first] == ORDER and not any(r.skipped for r in first)
    before = manifests(runs_dir / "tiny")
    assert all(m["status"] == "complete" for m in before.values())

    second = run_pipeline(tiny_pipeline(pretrain_steps=4), runs_dir)
    assert all(r.skipped for r in second)
    assert manifests(runs_dir / "tiny") == before

    third = run_pipeline(tiny_pipeline(pretrain_steps=6), runs_dir)
    assert [r.stage for r in third if not r.skipped] == DOWNSTREAM_OF_PRETRAIN
    after = manifests(runs_dir / "tiny")
    for stage in ORDER:
        if stage in DOWNSTREAM_OF_PRETRAIN:
            assert after[stage]["started_at"] >= before[stage]["finished_at"], stage
        else:
            assert after[stage] == before[stage], stage
    assert after["pretrain"]["ran_because"].startswith("config changed")
    # the later stages' own configs are unchanged: they re-ran because their input model changed
    for stage in ("sft", "dpo", "eval"):
        assert after[stage]["config_sha256"] == before[stage]["config_sha256"], stage
        assert after[stage]["ran_because"].startswith("inputs changed"), (stage, after[stage]["ran_because"])

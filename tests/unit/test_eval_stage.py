"""The eval stage end to end in-process: results.json / report.md / samples / lm-eval-schema
results, base vs chat columns, CORE recomputed from the per-task numbers, and the lineage cache
(skip when unchanged, re-run when a task file changes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmray import config as config_lib
from llmray import stages
from llmray.eval.scoring import centered
from tests.eval_support import exported_tiny_model

CORE_YAML = Path(__file__).resolve().parents[2] / "configs" / "eval" / "core.yaml"
TASKS = ["arc_easy", "copa", "winogrande", "lambada_openai", "gsm8k", "bpb_c4", "mine"]


def eval_config(shared_data, tmp_path, model_dir):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"context": f"{a} + {a} =", "choices": [str(2 * a), str(2 * a + 1)],
                                        "gold": 0}) + "\n" for a in range(6)))
    raw = config_lib.read_yaml(CORE_YAML)
    raw.update(checkpoints={"base": str(model_dir), "chat": str(model_dir)}, chat_models=["chat"],
               tasks=TASKS, limit=6, data_dir=str(shared_data), bootstrap_iters=50)
    raw["task_specs"]["gsm8k"]["max_new_tokens"] = 8
    raw["task_specs"]["arc_easy"]["num_fewshot"] = 2
    raw["task_specs"]["mine"] = {"format": "mc_jsonl", "path": str(mine)}
    raw["runner"] = {"num_actors": 0}
    return stages.build_config(stages.STAGES["eval"], raw, tmp_path / "run"), mine


def test_eval_stage_writes_results_and_honours_lineage(shared_data, tmp_path, one_thread):
    model_dir = exported_tiny_model()
    cfg, mine = eval_config(shared_data, tmp_path, model_dir)
    stage = stages.STAGES["eval"]
    result = stages.run_stage(stage, cfg, tmp_path / "run")
    assert not result.skipped
    results = json.loads((result.output / "results.json").read_text())
    assert set(results["checkpoints"]) == {"base", "chat"}
    assert results["checkpoints"]["chat"]["chat_template"] is True
    for name, checkpoint in results["checkpoints"].items():
        tasks = checkpoint["tasks"]
        assert set(tasks) == set(TASKS)
        assert set(tasks["arc_easy"]["metrics"]) == {"acc", "acc_norm"}
        assert tasks["arc_easy"]["num_fewshot"] == 2
        assert set(tasks["lambada_openai"]["metrics"]) == {"acc", "perplexity"}
        assert set(tasks["gsm8k"]["metrics"]) == {"exact_match"}
        assert tasks["bpb_c4"]["metrics"]["bits_per_byte"]["value"] > 0
        assert tasks["mine"]["random_baseline"] == 0.5
        for task in TASKS:
            assert tasks[task]["n"] == 6
            samples = (result.output / "samples" / name / f"{task}.jsonl").read_text().splitlines()
            assert len(samples) == 6
            for metric, value in tasks[task]["metrics"].items():
                assert value["stderr"] >= 0
                if metric in ("acc", "acc_norm", "exact_match"):  # the mean of the per-example scores
                    assert value["value"] == pytest.approx(sum(json.loads(s)[metric] for s in samples) / 6)
        # CORE: every task but gsm8k (core: false) and bits-per-byte, centered and averaged
        core = checkpoint["core"]
        used = {t: tasks[t] for t in ("arc_easy", "copa", "winogrande", "lambada_openai", "mine")}
        assert set(core["centered"]) == set(used)
        expected = [centered(t["metrics"][core["tasks"][n]["metric"]]["value"], t["random_baseline"])
                    for n, t in used.items()]
        assert core["value"] == pytest.approx(sum(expected) / len(expected))
        assert core["tasks"]["arc_easy"]["metric"] == "acc_norm"
    # the base model's prompts differ from the chat model's, so their numbers differ somewhere
    base, chat = (results["checkpoints"][n]["tasks"]["arc_easy"] for n in ("base", "chat"))
    base_lls = [json.loads(s)["loglikelihoods"] for s in (result.output / "samples/base/arc_easy.jsonl").open()]
    chat_lls = [json.loads(s)["loglikelihoods"] for s in (result.output / "samples/chat/arc_easy.jsonl").open()]
    assert base_lls != chat_lls and base["n"] == chat["n"]

    for name in ("base", "chat"):  # lm-eval's schema: one file per checkpoint
        lm_eval = json.loads((result.output / f"lm_eval_results.{name}.json").read_text())
        arc = results["checkpoints"][name]["tasks"]["arc_easy"]
        assert lm_eval["results"]["arc_easy"]["acc_norm,none"] == arc["metrics"]["acc_norm"]["value"]
        assert lm_eval["n-shot"]["arc_easy"] == 2 and lm_eval["results"]["bpb_c4"]["bits_per_byte,none"] > 0
        assert lm_eval["config"]["model_args"] == f"pretrained={model_dir}"
    assert not (result.output / "lm_eval_results.json").exists()

    table = (result.output / "report.md").read_text()
    assert table.splitlines()[0] == "| task | metric | n | shots | base | chat |"
    assert "| arc_easy | acc_norm | 6 | 2 |" in table and "| **CORE** |" in table
    metrics_log = [json.loads(line) for line in (tmp_path / "run/eval/metrics.jsonl").read_text().splitlines()]
    assert [m["checkpoint"] for m in metrics_log] == ["base", "chat"] and "core" in metrics_log[0]

    assert stages.run_stage(stage, cfg, tmp_path / "run").skipped  # unchanged: lineage cache
    mine.write_text(mine.read_text() + json.dumps({"context": "9 + 9 =", "choices": ["18", "19"], "gold": 0}) + "\n")
    assert not stages.run_stage(stage, cfg, tmp_path / "run").skipped  # a task file changed

"""The actor pool computes what the in-process run computes, and background evaluation does not block.

Two actors (0.5 CPU each on the session's 2-CPU Ray, one torch thread each) evaluate the same
requests as the in-process worker (one thread); every per-example score and every metric must be
identical, bit for bit.
"""

from __future__ import annotations

import json

import pytest

from llmray.eval.background import BackgroundEvaluator
from llmray.eval.runner import RunnerConfig, evaluate_model
from llmray.eval.stage import EvalConfig
from llmray.eval.tasks import TaskSpec, load_task
from tests.eval_support import exported_tiny_model

SPECS = {
    "arc_easy": (TaskSpec(format="arc", path="arc/ARC-Easy-Dev.jsonl"), 40),
    "winogrande": (TaskSpec(format="winogrande", path="winogrande/winogrande.jsonl"), 20),
    "lambada_openai": (TaskSpec(format="lambada", path="lambada/lambada_test.jsonl"), 20),
    "gsm8k": (TaskSpec(format="gsm8k", path="gsm8k/test.jsonl", max_new_tokens=8), 4),
    "bpb_c4": (TaskSpec(format="text", path="c4_sample/c4_demo.jsonl"), 3),
}


def test_two_actors_match_the_single_process_run(ray_session, shared_data, one_thread):
    model_dir = exported_tiny_model()
    tasks = [load_task(name, spec, shared_data, limit) for name, (spec, limit) in SPECS.items()]
    runner = dict(batch_size=8, max_batch_tokens=2048)
    single = evaluate_model(model_dir, tasks, RunnerConfig(num_actors=0, **runner), bootstrap_iters=100)
    pooled = evaluate_model(model_dir, tasks, RunnerConfig(num_actors=2, num_cpus_per_actor=0.5, **runner),
                            bootstrap_iters=100)
    for name in SPECS:
        assert len(single[name]["scores"]) == len(pooled[name]["scores"]) == SPECS[name][1]
        # bitwise: the same batches, computed with one thread each, give the very same floats
        assert single[name]["scores"] == pooled[name]["scores"], name
        assert single[name]["metrics"] == pooled[name]["metrics"], name


def test_background_evaluation_returns_at_once_and_writes_results(ray_session, shared_data, tmp_path):
    model_dir = exported_tiny_model()
    cfg = EvalConfig(checkpoints={"unused": str(model_dir)}, data_dir=str(shared_data), limit=5, bootstrap_iters=10,
                     task_specs={"copa": TaskSpec(format="icl_mc", path="copa/copa.jsonl")},
                     runner=RunnerConfig(num_actors=0, num_cpus_per_actor=0.5))  # the model runs in the task
    evaluator = BackgroundEvaluator(cfg, tmp_path / "evals")
    evaluator.submit("step_10", model_dir)
    evaluator.submit("step_20", model_dir)
    # submit returned while the evaluations are still running (a worker must first import torch
    # and load the model): nothing is finished and nothing is written yet
    assert evaluator.poll() == {} and sorted(evaluator.pending) == ["step_10", "step_20"]
    assert not (tmp_path / "evals" / "step_10").exists()
    finished = evaluator.wait()
    assert set(finished) == {"step_10", "step_20"} and evaluator.pending == []
    assert finished["step_10"] == finished["step_20"] and "copa/acc" in finished["step_10"]
    results = json.loads((tmp_path / "evals" / "step_20" / "results.json").read_text())
    assert results["checkpoints"]["step_20"]["path"] == str(model_dir)
    assert evaluator.poll() == {}


@pytest.mark.gpu
def test_fractional_gpu_actors_match_the_cpu_run(ray_session, shared_data, one_thread):
    model_dir = exported_tiny_model()
    tasks = [load_task("arc_easy", SPECS["arc_easy"][0], shared_data, 40)]
    cpu = evaluate_model(model_dir, tasks, RunnerConfig(num_actors=0, device="cpu"), bootstrap_iters=0)
    on_gpu = dict(num_actors=2, num_cpus_per_actor=0.5, num_gpus_per_actor=0.5)
    fp32 = evaluate_model(model_dir, tasks, RunnerConfig(precision="fp32", **on_gpu), bootstrap_iters=0)
    auto = evaluate_model(model_dir, tasks, RunnerConfig(precision="auto", **on_gpu), bootstrap_iters=0)  # bf16
    for one, two, three in zip(cpu["arc_easy"]["scores"], fp32["arc_easy"]["scores"], auto["arc_easy"]["scores"]):
        assert one["loglikelihoods"] == pytest.approx(two["loglikelihoods"], abs=1e-3)
        assert one["loglikelihoods"] == pytest.approx(three["loglikelihoods"], rel=0.05)

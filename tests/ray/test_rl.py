"""RL on the local Ray: the stage end to end, staleness bounds, exact resume, reward failures, actor
faults, and 2 FSDP2 learner workers on Ray Train against 1 in process.

Tolerance of the 2-worker equivalence: losses and gradient norms within 1e-5 relative (fp32; only
the order of reductions differs), and the rollouts token for token (same seeds, same weights).
"""

from __future__ import annotations

import json

import pytest
import ray
import torch

from llmray import config as config_lib
from llmray import stages
from llmray.rl.rollout import RolloutWorker
from llmray.rl.stage import RlConfig, render_prompts, rl_job
from llmray.rl.stream import Pending, RewardFunctionFailed, RolloutPool
from llmray.rl.tasks import arithmetic_problems
from llmray.train.launch import launch
from tests.align_support import export_tiny_model, template, tokenizer_dir
from tests.rl_support import CrashAfter, Interrupted

PAD_ID = 2


@pytest.fixture(scope="module")
def policy(shared_data, tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("policy"), shared_data, seed=0)


def rl_config(policy, shared_data, **overrides) -> RlConfig:
    raw = {"model": str(policy), "tokenizer": str(tokenizer_dir(shared_data)),
           "prompts": [{"kind": "arithmetic", "level": 1, "count": 60}], "eval_problems": 4,
           "prompts_per_step": 2, "group_size": 4, "micro_batch_size": 4, "sampling": {"max_new_tokens": 8},
           "reward": {"kind": "function", "function": "tests.rl_support:digit_share"},
           "rollout": {"actors": 2, "actor_cpus": 0.25},
           "train": {"steps": 4, "log_every": 1, "peak_flops": 1e11, "optimizer": {"lr": 3e-3}},
           "execution": {"launcher": "process", "threads_per_worker": 1}}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[key] = value
    return config_lib.from_dict(RlConfig, raw)


def _problems(shared_data, count=40):
    problems = arithmetic_problems(count, 1, seed=0)
    return problems, render_prompts(template(shared_data), problems)


def test_stage_trains_on_policy_exports_and_counts_failing_rewards(ray_session, policy, shared_data, tmp_path):
    cfg = rl_config(policy, shared_data, max_staleness=0,
                    **{"reward.function": "tests.rl_support:digit_share_failing_sometimes"})
    result = stages.run_stage(stages.STAGES["rl"], cfg, tmp_path / "run")
    summary = result.manifest["summary"]
    history = json.loads((result.output / "rollouts.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["oldest_sample_version"] == h["policy_version"] == h["step"] - 1 for h in history)
    assert summary["reward_failures"] > 0  # scored 0 and counted, the run went on
    assert summary["skipped_steps"] == 0
    assert 0 < sum(h["reward_failures"] for h in history) < 4 * 8
    assert summary["exact_match_before"] is not None and len(summary["ci95_after"]) == 2
    assert (result.output / "model" / "model.safetensors").is_file()
    report = (result.output / "report.md").read_text()
    assert "held-out greedy exact match" in report and "| 4 |" in report
    metrics = [json.loads(line) for line in (tmp_path / "run" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_mean" in m for m in metrics)


def test_a_reward_function_failing_everywhere_fails_the_stage_with_its_traceback(ray_session, policy, shared_data,
                                                                                tmp_path):
    cfg = rl_config(policy, shared_data, **{"reward.function": "tests.rl_support:always_failing"})
    with pytest.raises(RewardFunctionFailed) as failure:
        stages.run_stage(stages.STAGES["rl"], cfg, tmp_path / "run")
    message = str(failure.value)
    assert "failed on all 8 samples" in message
    assert "LookupError: the reward service is unreachable" in message and "always_failing" in message


def _losses_and_history(job):
    result = launch(job, connect_ray=lambda: None)
    return result.worker["losses"], result.worker["hooks"][0]


def test_one_version_behind_and_exact_resume_with_rollouts_in_flight(ray_session, policy, shared_data, tmp_path):
    cfg = rl_config(policy, shared_data, max_staleness=1, **{"train.checkpoint_every": 2})
    problems, prompts = _problems(shared_data)
    losses, history = _losses_and_history(rl_job(cfg, problems, prompts, PAD_ID, tmp_path / "whole"))
    assert [h["policy_version"] - h["oldest_sample_version"] for h in history] == [0, 1, 1, 1]

    with pytest.raises(Interrupted):
        launch(rl_job(cfg, problems, prompts, PAD_ID, tmp_path / "split", hooks=(CrashAfter(2),)),
               connect_ray=lambda: None)
    resumed_losses, resumed_history = _losses_and_history(rl_job(cfg, problems, prompts, PAD_ID, tmp_path / "split"))
    assert sorted(resumed_losses) == [3, 4]
    assert resumed_losses == {step: losses[step] for step in (3, 4)}  # bit-identical on CPU
    drop_timing = lambda h: {k: v for k, v in h.items() if k not in ("rollout_wait_s", "loss")}  # noqa: E731
    assert [drop_timing(h) for h in resumed_history] == [drop_timing(h) for h in history[2:]]


def test_a_rollout_actor_killed_mid_step_is_replaced_and_the_batch_completes(ray_session, policy, shared_data):
    cfg = rl_config(policy, shared_data)
    problems, prompts = _problems(shared_data)
    spec = rl_job(cfg, problems, prompts, PAD_ID, "unused").train_data
    items = spec.work_items(0)
    pool = RolloutPool(spec)
    try:
        pending = pool.submit(Pending(0, 0), items)
        ray.kill(pool.actors[0], no_restart=True)  # its chunk is in flight
        samples = pool.collect(pending)
        assert pool.replaced == 1
    finally:
        pool.close()
    torch.set_num_threads(1)
    local = RolloutWorker(str(policy), cfg.tokenizer, cfg.sampling, cfg.reward, reference=False)
    expected = local.samples(items)
    assert [(s["problem"], s["sample"]) for s in samples] == [(i.problem, i.sample) for i in items]
    assert [s["completion"].tolist() for s in samples] == [s["completion"].tolist() for s in expected]


def test_weights_broadcast_to_the_actors_train_exactly_as_through_the_object_store(ray_session, policy, shared_data,
                                                                                     tmp_path):
    problems, prompts = _problems(shared_data)
    runs = {}
    for sync in ("object_store", "broadcast"):
        cfg = rl_config(policy, shared_data, max_staleness=1, **{"train.steps": 3, "rollout.weight_sync": sync})
        runs[sync] = _losses_and_history(rl_job(cfg, problems, prompts, PAD_ID, tmp_path / sync))
    (losses, history), (broadcast_losses, broadcast_history) = runs["object_store"], runs["broadcast"]
    assert broadcast_losses == losses  # the same weights reached the actors, so the same samples and updates
    assert any(loss != 0 for loss in losses.values())
    drop_timing = lambda h: {k: v for k, v in h.items() if k != "rollout_wait_s"}  # noqa: E731
    assert [drop_timing(h) for h in broadcast_history] == [drop_timing(h) for h in history]


def test_an_actor_killed_after_a_broadcast_is_replaced_and_sent_the_weights_again(ray_session, policy, shared_data):
    cfg = rl_config(policy, shared_data, **{"rollout.weight_sync": "broadcast"})
    problems, prompts = _problems(shared_data)
    spec = rl_job(cfg, problems, prompts, PAD_ID, "unused").train_data
    torch.set_num_threads(1)
    local = RolloutWorker(str(policy), cfg.tokenizer, cfg.sampling, cfg.reward, reference=False)
    with torch.no_grad():
        for parameter in local.policy.parameters():
            parameter.mul_(1.5)  # version 1: weights that differ from the model directory's
    local.key = (1, 1)
    items = spec.work_items(0)
    pool = RolloutPool(spec)
    try:
        assert pool.publish((1, 1), local.policy.state_dict(), torch.device("cpu")) is None  # broadcast, no reference
        pending = pool.submit(Pending(0, 1, key=(1, 1)), items)
        ray.kill(pool.actors[1], no_restart=True)
        samples = pool.collect(pending)
        assert pool.replaced == 1 and pool.generation == 2  # a new group for the new actor
    finally:
        pool.close()
    expected = local.samples(items)
    assert [s["version"] for s in samples] == [1] * len(items)
    assert [s["completion"].tolist() for s in samples] == [s["completion"].tolist() for s in expected]


def test_two_fsdp2_learners_on_ray_train_match_one_in_process(ray_session, policy, shared_data, tmp_path):
    problems, prompts = _problems(shared_data)
    one = rl_config(policy, shared_data, **{"train.steps": 3})
    two = rl_config(policy, shared_data, **{"train.steps": 3},
                    execution={"launcher": "ray_train", "workers": 2, "cpus_per_worker": 0.5},
                    parallel={"strategy": "fsdp2"})
    assert two.grad_accum() == 1 and one.grad_accum() == 2
    single = launch(rl_job(one, problems, prompts, PAD_ID, tmp_path / "one"), connect_ray=lambda: None).worker
    double = launch(rl_job(two, problems, prompts, PAD_ID, tmp_path / "two"), connect_ray=lambda: None).worker
    assert sorted(double["losses"]) == [1, 2, 3]
    for step, loss in single["losses"].items():
        assert double["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    rewards = lambda worker: [h["reward_mean"] for h in worker["hooks"][0]]  # noqa: E731
    assert rewards(double) == pytest.approx(rewards(single), rel=1e-6)
    assert any(loss != 0 for loss in single["losses"].values())  # some group had unequal rewards: a real update
    assert double["metrics"]["grad_norm"] == pytest.approx(single["metrics"]["grad_norm"], rel=1e-5, abs=1e-8)


def test_reward_model_trains_on_preference_pairs_and_scores_rl_rollouts(ray_session, policy, shared_data, tmp_path):
    reward_cfg = config_lib.from_dict(stages.STAGES["reward"].config_cls, {
        "model": str(policy), "tokenizer": str(tokenizer_dir(shared_data)), "val_fraction": 0.2,
        "batch": {"seq_len": 127, "micro_batch_size": 8},
        "sources": [{"kind": "hh_rlhf", "path": str(shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz"),
                     "max_records": 120}],
        "train": {"steps": 24, "log_every": 4, "peak_flops": 1e11, "optimizer": {"lr": 3e-3},
                  "schedule": {"warmup_steps": 2}},
        "execution": {"threads_per_worker": 1}})
    trained = stages.run_stage(stages.STAGES["reward"], reward_cfg, tmp_path / "run")
    summary = trained.manifest["summary"]
    assert summary["final"]["train_loss"] < summary["initial"]["train_loss"] - 0.05
    assert summary["final"]["train_accuracy"] > 0.6  # it fits its training pairs
    low, high = summary["val_accuracy_ci95"]
    assert low <= summary["val_accuracy"] <= high and summary["final"]["val_pairs"] >= 15
    assert "95% Wilson interval" in (trained.output / "report.md").read_text()
    reward_model = trained.output / "model"
    assert json.loads((reward_model / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]

    rl = rl_config(policy, shared_data, **{"train.steps": 2, "reward.kind": "reward_model",
                                           "reward.model": str(reward_model), "reward.format_weight": 0.0})
    result = stages.run_stage(stages.STAGES["rl"], rl, tmp_path / "run")
    history = json.loads((result.output / "rollouts.json").read_text())
    assert len(history) == 2 and all(h["reward_failures"] == 0 for h in history)
    assert all(h["correct_mean"] not in (0.0, 1.0) for h in history)  # real-valued model scores, not 0/1

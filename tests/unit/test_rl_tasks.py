"""RL problems, rewards and rollouts in one process: answers, quarantine, failures, reproducibility."""

from __future__ import annotations

import json

import pytest
import torch

from llmray.align.records import Quarantined
from llmray.rl.rewards import RewardConfig, Rewarder
from llmray.rl.rollout import RolloutWorker, SamplingSpec, completion_logps, from_wire, to_wire
from llmray.rl.grpo import GrpoConfig
from llmray.rl.stream import RolloutPoolConfig, RolloutSpec
from llmray.rl.tasks import Problem, PromptSource, arithmetic_problems, final_number, read_problems
from tests.align_support import export_tiny_model, template, tokenizer_dir


@pytest.mark.parametrize("text, number", [("so 12 + 3 = 15", "15"), ("It is 1,234.", "1234"), ("-7", "-7"),
                                          ("3.50 dollars", "3.5"), ("4.0", "4"), ("no digits", None)])
def test_final_number(text, number):
    assert final_number(text) == number


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_arithmetic_problems_are_seeded_distinct_and_right(level):
    problems = arithmetic_problems(50, level, seed=3)
    assert problems == arithmetic_problems(50, level, seed=3)
    assert problems != arithmetic_problems(50, level, seed=4)
    assert len({p.id for p in problems}) == len(problems) == 50
    for p in problems:
        expression = p.messages[0]["content"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expression)) == p.answer  # the test's independent check of the generator's arithmetic
        assert expression.count(" ") == {1: 2, 2: 2, 3: 2, 4: 4, 5: 4}[level]
    assert len(arithmetic_problems(500, 1, seed=0)) == 100  # every one-digit sum, once


def test_gsm8k_answers_and_bad_records_name_their_line(shared_data, tmp_path):
    problems = list(read_problems(PromptSource(kind="gsm8k", path=str(shared_data / "gsm8k" / "test.jsonl"),
                                               count=20)))
    assert len(problems) == 20 and all(isinstance(p, Problem) for p in problems)
    first = json.loads((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
    assert problems[0].answer == first["answer"].split("####")[1].strip().replace(",", "")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "x"}\nnot json\n'
                   '{"messages": [{"role": "user", "content": "1+1?"}], "answer": 2}\n{"prompt": "y", "answer": "none"}\n')
    items = list(read_problems(PromptSource(kind="jsonl", path=str(bad))))
    good = [i for i in items if isinstance(i, Problem)]
    quarantined = {q.offset: q for q in items if isinstance(q, Quarantined)}
    assert [p.answer for p in good] == ["4", "2"]
    assert sorted(quarantined) == [2, 3, 5]
    assert "has no 'answer'" in quarantined[2].message and quarantined[2].message.startswith(f"{bad}:2:")
    assert "no number" in quarantined[5].message


def _fails_on_odd(completion: str, problem: Problem) -> float:
    if int(problem.answer) % 2:
        raise ZeroDivisionError("odd answers break this reward")
    return 1.0


def test_rewarder_scores_format_and_marks_failures():
    problem = Problem("p", ({"role": "user", "content": "What is 1 + 2?"},), "3")
    rewarder = Rewarder(RewardConfig(format_weight=0.1))
    assert rewarder("1 + 2 = 3", problem, finished=True).reward == pytest.approx(1.1)
    assert rewarder("it is 4", problem, finished=False).reward == 0.0
    failing = Rewarder(RewardConfig(kind="function", function="tests.unit.test_rl_tasks:_fails_on_odd"))
    scored = failing("3", problem, finished=True)
    assert scored.reward == 0.0 and "ZeroDivisionError: odd answers break this reward" in scored.error
    assert failing("2", Problem("q", problem.messages, "2"), finished=False).reward == 1.0
    wrong_signature = Rewarder(RewardConfig(kind="function", function="math:sqrt"))
    assert "TypeError" in wrong_signature("x", problem, True).error
    with pytest.raises(ValueError, match="no callable"):
        Rewarder(RewardConfig(kind="function", function="math:no_such_function"))


def test_a_reward_model_config_needs_no_function():
    """kind reward_model scores with the model (``from_value``); it must not look up ``function``."""
    rewarder = Rewarder(RewardConfig(kind="reward_model", model="some/reward/model", format_weight=0.25))
    assert rewarder.from_value(0.5, finished=True).reward == pytest.approx(0.75)


@pytest.fixture(scope="module")
def worker(shared_data, tmp_path_factory):
    model_dir = export_tiny_model(tmp_path_factory.mktemp("policy"), shared_data, seed=0)
    torch.set_num_threads(1)
    return RolloutWorker(str(model_dir), str(tokenizer_dir(shared_data)), SamplingSpec(max_new_tokens=12),
                         RewardConfig(), reference=True)


def _spec(shared_data, problems):
    chat = template(shared_data)
    prompts = [tuple(chat.render(p.messages, add_generation_prompt=True).ids) for p in problems]
    return RolloutSpec(problems=problems, prompts=prompts, model_dir="", tokenizer_dir="",
                       sampling=SamplingSpec(max_new_tokens=12), reward=RewardConfig(), grpo=GrpoConfig(),
                       pool=RolloutPoolConfig(), prompts_per_step=3, group_size=4, micro_batch_size=4,
                       max_staleness=0, seed=7, learner_row_tokens=512)


def test_rollouts_depend_only_on_seed_and_weights(worker, shared_data):
    spec = _spec(shared_data, arithmetic_problems(10, 2, seed=0))
    items = spec.work_items(5)
    assert items == spec.work_items(5) and items != spec.work_items(6)
    assert [i.problem for i in items[:4]] == [items[0].problem] * 4  # one group per problem
    whole = worker.samples(items)
    chunked = worker.samples(items[7:]) + worker.samples(items[:7])  # other chunks, other batch neighbours
    chunked = chunked[5:] + chunked[:5]
    key = lambda s: (s["problem"], s["sample"])  # noqa: E731
    assert sorted(map(key, whole)) == sorted(map(key, chunked))
    for a, b in zip(sorted(whole, key=key), sorted(chunked, key=key)):
        assert a["completion"].tolist() == b["completion"].tolist()
        torch.testing.assert_close(a["old_logps"], b["old_logps"], atol=1e-5, rtol=1e-5)
    assert len({tuple(s["completion"].tolist()) for s in whole[:4]}) > 1  # a group's samples differ


def test_samples_cross_from_actor_to_learner_as_arrays_and_come_back_unchanged(worker, shared_data):
    import pickle

    samples = worker.samples(_spec(shared_data, arithmetic_problems(4, 1, seed=0)).work_items(0))
    wire = to_wire(samples)
    assert not any(isinstance(v, torch.Tensor) for sample in wire for v in sample.values())
    back = from_wire(pickle.loads(pickle.dumps(wire)))
    assert [sorted(s) for s in back] == [sorted(s) for s in samples]
    for got, want in zip(back, samples):
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
            else:
                assert got[key] == value, key


def test_behaviour_log_probs_are_the_policys_own(worker, shared_data):
    spec = _spec(shared_data, arithmetic_problems(4, 1, seed=0))
    samples = worker.samples(spec.work_items(0))
    for s in samples:  # one at a time, no padding: the learner's view of the same sequence
        alone = completion_logps(worker.policy, [s["prompt"].tolist()], [s["completion"].tolist()])[0]
        torch.testing.assert_close(s["old_logps"], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s["ref_logps"], s["old_logps"], atol=1e-5, rtol=1e-5)  # version 0: the reference is the policy
        assert s["version"] == 0 and s["reward"] in (0.0, 0.1, 1.0, 1.1)


def test_rl_config_keeps_loss_spike_detection_off():
    """GRPO's loss hovers around 0 and changes sign: spike detection would skip most steps (it did,
    129 of 150, before RL configs turned it off), so the stage refuses it."""
    from llmray import config as config_lib
    from llmray.rl.stage import RlConfig

    cfg = config_lib.from_dict(RlConfig, {"prompts": [{"kind": "arithmetic"}], "train": {"guards": {"window": 20}}})
    assert cfg.train.guards.spike_mode == "off" and cfg.train.guards.window == 20
    with pytest.raises(config_lib.ConfigError, match="spike_mode must be off"):
        config_lib.from_dict(RlConfig, {"prompts": [{"kind": "arithmetic"}], "train": {"guards": {"spike_mode": "ratio"}}})

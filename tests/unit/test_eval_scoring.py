"""Scoring against hand-computed numbers: a bigram Transformer whose log-probabilities are written down.

The toy model (tests/eval_support.bigram_model) puts the logits ``TABLE[previous token]`` at
every position; its rows are log-probabilities, so ``log p(next | prev)`` is read straight from
the table and every expected log-likelihood below is a sum of logs of hand-chosen numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmray.eval import prompts, scoring, worker
from llmray.eval.tasks import Example, Task, TaskSpec, multiple_choice
from llmray.tokenizer import chat
from tests.eval_support import bigram_model, word_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "a"]
VOCAB = len(chat.SPECIAL_TOKENS) + len(WORDS)  # 16
ID = {w: len(chat.SPECIAL_TOKENS) + i for i, w in enumerate(WORDS)}
BOS = 0

# p(next | prev) for the transitions the tests use; the rest of each row's mass is spread evenly.
PROBS = {
    BOS: {ID["the"]: 0.6},
    ID["the"]: {ID["cat"]: 0.3, ID["dog"]: 0.2},
    ID["cat"]: {ID["sat"]: 0.7},
    ID["sat"]: {ID["on"]: 0.5},
    ID["on"]: {ID["the"]: 0.4, ID["mat"]: 0.35},
    ID["dog"]: {ID["ran"]: 0.9},
    ID["ran"]: {ID["far"]: 0.9},
}


def prob(prev: int, nxt: int) -> float:
    row = PROBS.get(prev, {})
    if nxt in row:
        return row[nxt]
    return (1.0 - sum(row.values())) / (VOCAB - len(row))


TABLE = torch.tensor([[math.log(prob(p, n)) for n in range(VOCAB)] for p in range(VOCAB)])


@pytest.fixture(scope="module")
def model():
    return bigram_model(TABLE)


@pytest.fixture(scope="module")
def encoder():
    return prompts.Encoder(word_tokenizer(WORDS), BOS, (1,))


def ids(text: str) -> tuple[int, ...]:
    return tuple(ID[w] for w in text.split())


def test_bigram_model_logits_are_the_table(model):
    tokens = torch.tensor([[BOS, ID["the"], ID["cat"]]])
    logits = model(tokens)[0]
    assert torch.allclose(logits, TABLE[tokens[0]], atol=1e-5)


def test_loglikelihood_equals_hand_computed_sum(model):
    request = prompts.LoglikelihoodRequest((BOS,) + ids("the"), ids("cat sat on"))
    (ll, greedy), = worker.loglikelihoods(model, [request])
    assert ll == pytest.approx(math.log(0.3) + math.log(0.7) + math.log(0.5), abs=1e-5)
    assert greedy is True  # cat, sat, on are each the row's most likely token

    request = prompts.LoglikelihoodRequest((BOS,) + ids("the"), ids("dog ran"))
    (ll, greedy), = worker.loglikelihoods(model, [request])
    assert ll == pytest.approx(math.log(0.2) + math.log(0.9), abs=1e-5)
    assert greedy is False  # after "the", "cat" (0.3) beats "dog" (0.2)


def test_batched_rows_of_different_lengths_score_as_alone(model):
    requests = [prompts.LoglikelihoodRequest((BOS,) + ids("the cat sat on"), ids("mat")),
                prompts.LoglikelihoodRequest((BOS,), ids("the dog ran far")),
                prompts.LoglikelihoodRequest((BOS,) + ids("on"), ids("the"))]
    together = worker.loglikelihoods(model, requests)
    alone = [worker.loglikelihoods(model, [r])[0] for r in requests]
    assert [g for _, g in together] == [g for _, g in alone]
    assert [ll for ll, _ in together] == pytest.approx([ll for ll, _ in alone], abs=1e-6)
    assert together[0][0] == pytest.approx(math.log(0.35), abs=1e-5)
    assert together[1][0] == pytest.approx(math.log(0.6) + math.log(0.2) + 2 * math.log(0.9), abs=1e-5)


def test_context_longer_than_the_model_is_cut_from_the_left(model):
    context = (BOS,) + ids("the cat sat on") * 40  # 161 tokens, max_seq_len 64
    (ll, _), = worker.loglikelihoods(model, [prompts.LoglikelihoodRequest(context, ids("mat"))])
    assert ll == pytest.approx(math.log(0.35), abs=1e-5)


def mc_task(examples: list[Example], kind_format: str = "mc_jsonl") -> Task:
    return Task("toy", TaskSpec(format=kind_format, path="unused"), examples, examples, True)


def test_acc_and_acc_norm_disagree_where_length_matters(model, encoder):
    # "cat": log 0.3 = -1.20 over 3 characters (-0.40/char); "dog ran far": log(0.2·0.9·0.9) = -1.82
    # over 11 characters (-0.17/char). acc picks the short answer, acc_norm the long (gold) one.
    example = multiple_choice("1", "the", ["cat", "dog ran far"], gold=1, delimiter=" ")
    task = mc_task([example])
    requests = prompts.example_requests(task, 0, encoder, seed=0, max_seq_len=64)
    assert [r.context for r in requests] == [(BOS, ID["the"])] * 2
    assert [r.continuation for r in requests] == [ids("cat"), ids("dog ran far")]
    score = scoring.score_example(task, example, worker.loglikelihoods(model, requests))
    assert score["loglikelihoods"] == pytest.approx([math.log(0.3), math.log(0.2 * 0.9 * 0.9)], abs=1e-5)
    assert (score["pred"], score["pred_norm"]) == (0, 1)
    assert (score["acc"], score["acc_norm"]) == (0, 1)


def test_acc_norm_divides_by_the_characters_of_the_choice_text_as_lm_eval_does():
    # lm-evaluation-harness: argmax(ll / len(choice)) over its doc_to_choice strings (no target
    # delimiter). Per character: -1.6/2 = -0.80 vs -2.0/3 = -0.67, choice 1. Per UTF-8 byte of the
    # continuations " éé" / " abc" (llmray's old rule): -1.6/5 = -0.32 vs -2.0/4 = -0.50, choice 0.
    example = multiple_choice("n", "q", ["éé", "abc"], gold=0, delimiter=" ")
    assert example.norm_lengths() == [2, 3]
    assert len(example.continuations[0].encode("utf-8")) == 5  # " éé": 5 bytes, 3 characters
    lls = [-1.6, -2.0]
    assert scoring.choose(lls, example.norm_lengths()) == (0, 1)
    assert scoring.choose(lls, [len(c.encode("utf-8")) for c in example.continuations]) == (0, 0)
    score = scoring.score_example(mc_task([example]), example, [(ll, False) for ll in lls])
    assert (score["pred"], score["pred_norm"], score["acc_norm"]) == (0, 1, 0)


def test_acc_and_acc_norm_agree_when_lengths_are_equal(model, encoder):
    example = multiple_choice("2", "the", ["cat", "dog"], gold=0, delimiter=" ")
    task = mc_task([example])
    results = worker.loglikelihoods(model, prompts.example_requests(task, 0, encoder, 0, 64))
    score = scoring.score_example(task, example, results)
    assert (score["acc"], score["acc_norm"]) == (1, 1)


def test_partial_scoring_compares_contexts_on_a_shared_continuation(model, encoder):
    # Winogrande style: the options differ in the context; the continuation " mat" is scored.
    example = Example("3", ("the cat sat on", "the cat sat"), (" mat", " mat"), gold=0)
    task = mc_task([example], "winogrande")
    requests = prompts.example_requests(task, 0, encoder, 0, 64)
    assert [r.continuation for r in requests] == [ids("mat")] * 2
    score = scoring.score_example(task, example, worker.loglikelihoods(model, requests))
    assert score["loglikelihoods"] == pytest.approx([math.log(0.35), math.log(prob(ID["sat"], ID["mat"]))],
                                                    abs=1e-5)
    assert score["acc"] == 1


def test_chat_template_prompt_ends_with_the_assistant_header(encoder):
    example = multiple_choice("4", "the", ["cat", "dog"], gold=0, delimiter=" ")
    requests = prompts.example_requests(mc_task([example]), 0, encoder, 0, 64)  # plain
    template = chat.ChatTemplate(encoder.tokenizer)
    chat_encoder = prompts.Encoder(encoder.tokenizer, BOS, (1,), template)
    chat_requests = prompts.example_requests(mc_task([example]), 0, chat_encoder, 0, 64)
    expected = template.render([{"role": "user", "content": "the"}], add_generation_prompt=True).ids
    assert all(r.context == tuple(expected) for r in chat_requests)
    assert [r.continuation for r in chat_requests] == [r.continuation for r in requests]


def test_lm_eval_pair_split_moves_trailing_space_into_the_continuation(encoder):
    context_ids, continuation_ids = encoder.pair("the cat ", "sat")
    assert context_ids == [BOS] + list(ids("the cat"))
    assert continuation_ids == list(ids("sat"))


def test_fewshot_prefix_is_seeded_and_never_the_example_itself():
    examples = [multiple_choice(str(i), f"q{i}", ["x", "y"], gold=i % 2, delimiter=" ") for i in range(10)]
    task = Task("toy", TaskSpec(format="mc_jsonl", path="unused", num_fewshot=3), examples, examples, True)
    for index in range(10):
        shots = prompts.fewshot_examples(task, index, seed=7)
        assert len(shots) == 3 and examples[index] not in shots
        assert shots == prompts.fewshot_examples(task, index, seed=7)
    assert any(prompts.fewshot_examples(task, i, 7) != prompts.fewshot_examples(task, i, 8) for i in range(10))


def test_rolling_windows_predict_every_token_once_and_bpb_matches_hand_sum(model):
    words = "the cat sat on the mat " * 20
    tokens = [BOS] + list(ids(words))  # 121 tokens, windows of <= 64 predictions
    windows = prompts.rolling_windows(BOS, tokens[1:], 64)
    predicted = [t for w in windows for t in w.continuation]
    assert predicted == tokens[1:]
    assert all(len(w.context) + len(w.continuation) <= 65 and w.context for w in windows)
    results = worker.loglikelihoods(model, windows)
    expected_nll = -sum(math.log(prob(a, b)) for a, b in zip(tokens, tokens[1:]))
    example = Example("doc", ("",), (words,))
    task = Task("text", TaskSpec(format="text", path="unused"), [example], [example], True)
    score = scoring.score_example(task, example, results)
    assert score["nll"] == pytest.approx(expected_nll, rel=1e-6)
    metrics = scoring.aggregate(task, [score], bootstrap_iters=10)
    assert metrics["bits_per_byte"]["value"] == pytest.approx(expected_nll / (math.log(2) * len(words)), rel=1e-6)


def test_greedy_generation_stops_at_stop_strings_and_tokens(model, encoder):
    # greedy chain from "the": cat (0.3) -> sat (0.7) -> on (0.5) -> the (0.4) -> cat ...
    prompt = (BOS, ID["the"])
    request = prompts.GenerationRequest(prompt, 12, ("on",), (1,))
    text, = worker.generate_until(model, encoder.tokenizer, [request])
    assert text.split() == ["cat", "sat"]
    budget_of_5 = prompts.GenerationRequest(prompt, 5, (), (1,))
    from_on = prompts.GenerationRequest((BOS, ID["on"]), 12, ("dog",), (1,))
    texts = worker.generate_until(model, encoder.tokenizer, [budget_of_5, from_on])
    assert [t.split() for t in texts] == [["cat", "sat", "on", "the", "cat"], ["the", "cat", "sat", "on", "the",
                                                                               "cat", "sat", "on", "the", "cat",
                                                                               "sat", "on"]]
    stop_at_sat = prompts.GenerationRequest(prompt, 12, (), (ID["sat"],))
    assert worker.generate_until(model, encoder.tokenizer, [stop_at_sat])[0].split() == ["cat"]
    with pytest.raises(ValueError, match="share their stop tokens"):
        worker.generate_until(model, encoder.tokenizer, [budget_of_5, stop_at_sat])


@pytest.mark.parametrize("completion, expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is 1,234.", "1234"),
    ("no number here", ""),
    ("first 3 then -4.50", "-4.5"),
])
def test_gsm8k_answer_extraction(completion, expected):
    assert scoring.extract_answer(completion) == expected


def test_core_centers_each_task_on_its_random_baseline():
    core = scoring.core_score({
        "four_way": {"metric": "acc", "value": 0.5, "stderr": 0.1, "baseline": 0.25},
        "two_way": {"metric": "acc", "value": 0.75, "stderr": 0.2, "baseline": 0.5},
        "chance": {"metric": "acc", "value": 0.25, "stderr": 0.0, "baseline": 0.25},
    })
    assert core["centered"] == pytest.approx({"four_way": 1 / 3, "two_way": 0.5, "chance": 0.0})
    assert core["value"] == pytest.approx((1 / 3 + 0.5 + 0.0) / 3)
    assert core["stderr"] == pytest.approx(math.sqrt((0.1 / 0.75) ** 2 + (0.2 / 0.5) ** 2) / 3)


def test_random_baseline_is_mean_inverse_choice_count():
    examples = [multiple_choice("a", "q", ["x", "y"], 0, " "), multiple_choice("b", "q", ["x", "y", "z", "w"], 0, " ")]
    assert mc_task(examples).random_baseline() == pytest.approx((0.5 + 0.25) / 2)


def test_aggregates_match_plain_arithmetic():
    examples = [multiple_choice(str(i), "q", ["x", "y"], i % 2, " ") for i in range(4)]
    task = mc_task(examples)
    scores = [{"gold": e.gold, "pred": 0, "pred_norm": e.gold, "acc": int(e.gold == 0), "acc_norm": 1}
              for e in examples]
    metrics = scoring.aggregate(task, scores)
    assert metrics["acc"]["value"] == 0.5 and metrics["acc_norm"]["value"] == 1.0
    assert metrics["acc"]["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)  # std (ddof 1) / sqrt(n)
    lambada = Task("lw", TaskSpec(format="lambada", path="unused"), [], [], True)
    scores = [{"loglikelihood": -1.0, "acc": 1}, {"loglikelihood": -3.0, "acc": 0}]
    metrics = scoring.aggregate(lambada, scores, bootstrap_iters=200)
    assert metrics["perplexity"]["value"] == pytest.approx(math.exp(2.0))
    assert metrics["acc"]["value"] == 0.5 and metrics["perplexity"]["stderr"] > 0

"""Generation: KV cache equals recomputation, batching is invisible, sampling filters, stops, limits."""

from __future__ import annotations

import math

import pytest
import torch

from llmray.model.config import preset
from llmray.model.generate import (FINISHED, Decoder, SamplingConfig, filter_logits, generate, sample,
                                   sample_own_generators, stream)
from llmray.model.llama import build

GREEDY = SamplingConfig(max_new_tokens=64, temperature=0.0)


def _model(**overrides):
    """An untied tiny model with fan-in-scaled random weights: unlike the 0.02 init (whose greedy
    output repeats the last token), its greedy trajectories wander, so equality tests mean something."""
    torch.manual_seed(0)
    model = build(preset("tiny", vocab_size=256, tie_embeddings=False, **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5)
    return model


def _recompute_greedy(model, prompt: list[int], steps: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.mark.parametrize("overrides", [dict(), dict(qk_norm=True, sliding_window=16)], ids=["gqa", "qknorm-window"])
def test_kv_cache_greedy_equals_full_recomputation_for_64_tokens(overrides):
    model = _model(**overrides)
    prompt = [5, 17, 200, 3, 99, 42, 7, 150]
    cached = generate(model, [prompt], GREEDY)[0]
    assert len(cached) == 64
    assert cached == _recompute_greedy(model, prompt, 64)
    assert len(set(cached)) > 10  # a real trajectory, not one token repeated


def test_batched_prompts_of_different_lengths_equal_one_at_a_time():
    model = _model(sliding_window=8)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], list(range(30, 42))]
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0)
    batched = generate(model, prompts, cfg)
    assert batched == [generate(model, [p], cfg)[0] for p in prompts]


def test_greedy_is_deterministic_and_seeded_sampling_reproducible():
    model = _model()
    prompt = [[4, 5, 6]]
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    assert generate(model, prompt, greedy) == generate(model, prompt, greedy)
    sampled = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=123)
    first = generate(model, prompt, sampled)
    assert first == generate(model, prompt, sampled)
    assert first != generate(model, prompt, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=124))


def test_stop_token_ends_a_row_which_then_yields_finished():
    model = _model()
    prompts = [[10, 11, 12], [20, 21, 22, 23]]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0.0))
    # the first token of row 0, after the start, that neither row produced before
    at = next(i for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i] and t not in free[1])
    stop = free[0][at]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_tokens=[stop])
    steps = torch.stack(list(stream(model, prompts, cfg)))  # (steps, B)
    assert steps[:, 0].tolist() == free[0][:at] + [stop] + [FINISHED] * (11 - at)
    assert steps[:, 1].tolist() == free[1]
    assert generate(model, prompts, cfg) == [free[0][:at], free[1]]


def test_generation_stops_at_max_seq_len():
    model = _model(max_seq_len=16)
    assert len(generate(model, [[1] * 10], SamplingConfig(max_new_tokens=50, temperature=0.0))[0]) == 6
    with pytest.raises(ValueError, match="no room"):
        generate(model, [[1] * 16], GREEDY)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], GREEDY)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))
    kept = lambda filtered: (filtered[0] > float("-inf")).nonzero().flatten().tolist()
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [1, 3]
    assert kept(filter_logits(logits, top_k=None, top_p=0.5)) == [1]
    assert kept(filter_logits(logits, top_k=None, top_p=0.6)) == [1, 3]
    assert len(kept(filter_logits(logits, top_k=None, top_p=0.8))) == 3
    assert kept(filter_logits(logits, top_k=None, top_p=0.9)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_k=1, top_p=0.9)) == [1]


def test_sampling_follows_the_tempered_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.log(probs).expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    draws = sample(logits, SamplingConfig(temperature=1.0), generator)
    torch.testing.assert_close(torch.bincount(draws, minlength=4) / 20000, probs, atol=0.015, rtol=0)
    cold = sample(logits, SamplingConfig(temperature=0.5), generator)
    tempered = probs ** 2 / (probs ** 2).sum()
    torch.testing.assert_close(torch.bincount(cold, minlength=4) / 20000, tempered, atol=0.015, rtol=0)
    top_two = sample(logits, SamplingConfig(temperature=1.0, top_k=2), generator)
    assert set(top_two.tolist()) == {2, 3}
    assert math.isclose((top_two == 3).float().mean().item(), 4 / 7, abs_tol=0.015)


def test_rows_with_their_own_generators_follow_the_distribution_and_skip_filtered_tokens():
    probs = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    logits = torch.log(probs).expand(20000, 5)
    generators = [torch.Generator().manual_seed(i) for i in range(20000)]
    draws = sample_own_generators(logits, SamplingConfig(temperature=1.0), generators)
    torch.testing.assert_close(torch.bincount(draws, minlength=5) / 20000, probs, atol=0.015, rtol=0)
    nucleus = sample_own_generators(logits, SamplingConfig(temperature=1.0, top_p=0.5), generators)
    assert set(nucleus.tolist()) == {3, 4}
    again = sample_own_generators(logits[:7], SamplingConfig(temperature=1.0),
                                  [torch.Generator().manual_seed(i) for i in range(7)])
    assert again.tolist() == draws[:7].tolist()  # a row's draw depends only on its own generator


def test_per_row_settings_batched_equal_each_row_alone():
    """Unrelated requests decode together (a server's batch): each row keeps its own budget, stop
    tokens, temperature and seed, and gets exactly the tokens it gets alone."""
    model = _model()
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], list(range(30, 42)), [77, 78]]
    free = generate(model, [prompts[1]], SamplingConfig(max_new_tokens=12, temperature=0.0))[0]
    rows = [SamplingConfig(max_new_tokens=5, temperature=0.0),
            SamplingConfig(max_new_tokens=12, temperature=0.0, stop_tokens=[free[6]]),
            SamplingConfig(max_new_tokens=9, temperature=0.9, top_p=0.9, seed=7),
            SamplingConfig(max_new_tokens=12, temperature=1.2, top_k=20, seed=7)]
    batched = generate(model, prompts, rows)
    alone = [generate(model, [prompt], cfg)[0] for prompt, cfg in zip(prompts, rows)]
    assert batched == alone
    assert [len(c) for c in batched[:1] + batched[2:]] == [5, 9, 12]
    assert batched[1] == free[:free.index(free[6])]  # cut before the stop token's first occurrence
    greedy = generate(model, prompts[2:], SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert batched[2] != greedy[0][:9] and batched[3] != greedy[1]  # the sampled rows really sampled


def test_finished_rows_yield_finished_and_a_sent_mask_ends_rows_early():
    model = _model()
    prompts = [[10, 11, 12], [20, 21, 22, 23]]
    rows = [SamplingConfig(max_new_tokens=3, temperature=0.0), SamplingConfig(max_new_tokens=8, temperature=0.0)]
    steps = torch.stack(list(stream(model, prompts, rows)))  # (8, 2)
    assert steps.shape == (8, 2) and steps[3:, 0].tolist() == [FINISHED] * 5
    decoder = stream(model, prompts, rows)
    first = next(decoder)
    second = decoder.send(torch.tensor([False, True]))  # row 1 finishes after its first token
    assert second[1].item() == FINISHED and second[0].item() == steps[1, 0].item()
    assert first.tolist() == steps[0].tolist()
    assert decoder.send(None)[0].item() == steps[2, 0].item()
    with pytest.raises(StopIteration):  # both rows done: no further model step
        decoder.send(None)


def test_per_row_configs_must_match_prompts():
    model = _model()
    with pytest.raises(ValueError, match="1 sampling configs for 2 prompts"):
        generate(model, [[1], [2]], [GREEDY])


def test_each_row_gets_its_own_room_within_max_seq_len():
    """A long prompt does not shorten its neighbours' answers: each row is capped by its own length."""
    model = _model(max_seq_len=16)
    cfg = SamplingConfig(max_new_tokens=13, temperature=0.0)
    together = generate(model, [[1] * 10, [2, 3, 4]], cfg)
    assert [len(c) for c in together] == [6, 13]
    assert together == [generate(model, [p], cfg)[0] for p in ([1] * 10, [2, 3, 4])]


def test_rows_join_and_leave_a_decoder_between_steps_and_each_gets_its_lone_answer():
    """Continuous batching: rows added mid-decode are prefilled while the others continue; finished
    rows free their cache row (a later row moves in); the cache grows for a longer request."""
    model = _model(sliding_window=8)
    cfg = lambda budget: SamplingConfig(max_new_tokens=budget, temperature=0.0)
    plan = {0: [([5, 6, 7], cfg(12)), (list(range(40, 50)), cfg(4))],  # step -> rows added before it
            2: [([9, 9, 1, 2], cfg(20))],
            5: [([3], cfg(60)), (list(range(100, 117)), cfg(7))]}
    decoder = Decoder(model, max_rows=4, max_len=16)
    answers: dict = {}
    with pytest.raises(ValueError, match="no room"):
        decoder.add([1] * model.cfg.max_seq_len, cfg(1))
    for step in range(80):
        for prompt, row_cfg in plan.get(step, []):
            answers[id(decoder.add(prompt, row_cfg))] = (prompt, row_cfg, [])
        if step == 5:
            assert decoder.free_rows == 0
            with pytest.raises(ValueError, match="all 4 rows"):
                decoder.add([1], cfg(1))
        for row, token in decoder.step():
            answers[id(row)][2].append(token)
    assert decoder.step() == [] and decoder.cache.max_len == 64
    for prompt, row_cfg, tokens in answers.values():
        assert tokens == generate(model, [prompt], row_cfg)[0]
        assert len(tokens) == row_cfg.max_new_tokens


def test_kept_log_probs_are_the_untempered_teacher_forced_ones():
    """RL reads its behaviour log-probs off the decoding logits: they must equal a teacher-forced
    pass over prompt + completion (untempered and unfiltered, as the learner computes them), for
    rows of different lengths decoded together, whatever the sampling temperature and nucleus."""
    model = _model(sliding_window=8)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], list(range(30, 42))]
    decoder = Decoder(model, max_rows=3, max_len=32, keep_logps=True)
    rows = [decoder.add(p, SamplingConfig(max_new_tokens=12, temperature=t, top_p=0.9, seed=s))
            for p, t, s in zip(prompts, (0.7, 1.0, 1.6), (1, 2, 3))]
    tokens: dict = {id(row): [] for row in rows}
    while stepped := decoder.step():
        for row, token in stepped:
            tokens[id(row)].append(token)
    for prompt, row in zip(prompts, rows):
        sequence = prompt + tokens[id(row)]
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([sequence[:-1]]))[0].float(), dim=-1)
        expected = logps[len(prompt) - 1:].gather(-1, torch.tensor(tokens[id(row)])[:, None]).squeeze(-1)
        assert len(row.logps) == 12
        torch.testing.assert_close(torch.tensor(row.logps), expected, atol=1e-5, rtol=1e-5)

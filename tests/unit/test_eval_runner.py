"""Batching and shared-context scoring.

Batches are deterministic, cover every request once, keep the requests that share a context
together, respect their caps and never mix kinds. Scoring all choices of a question in one
packed row (context once, prefix-sharing mask) gives the log-likelihoods of one plain forward per
request within 1e-4 nats in fp32, on a real exported model and real prompts (few-shot ARC,
Winogrande partial scoring, rolling windows) and on a sliding-window model. Precision follows its
stated rule, and the pool reports progress in requests.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from llmray.eval import worker
from llmray.eval.prompts import GenerationRequest, LoglikelihoodRequest
from llmray.model.shared_context import pack, packed_length, shared_context_rows
from llmray.eval.runner import RunnerConfig, WorkerPool, make_batches, plan_requests, worker_args
from llmray.eval.tasks import TaskSpec, load_task
from llmray.model import hf, llama
from llmray.model.config import ModelConfig
from llmray.progress import Progress
from tests.eval_support import exported_tiny_model


def test_batches_cover_each_request_once_within_caps():
    rng = random.Random(0)
    contexts = [tuple(range(rng.randint(1, 60))) for _ in range(50)]
    requests = [LoglikelihoodRequest(contexts[i // 4], (i % 50 + 1,) * rng.randint(1, 5)) for i in range(200)]
    requests += [GenerationRequest((0,) * rng.randint(1, 20), 16, ("\n\n",), (1,)) for _ in range(20)]
    requests += [GenerationRequest((0,) * 5, 32, ("\n\n",), (1,)) for _ in range(3)]
    rng.shuffle(requests)
    cfg = RunnerConfig(batch_size=16, max_batch_tokens=400, generation_batch_size=8)
    batches = make_batches(requests, cfg, max_row_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(requests)))
    batch_of = {i: n for n, batch in enumerate(batches) for i in batch}
    for batch in batches:
        kinds = {(type(requests[i]), getattr(requests[i], "max_new_tokens", None)) for i in batch}
        assert len(kinds) == 1
        if isinstance(requests[batch[0]], GenerationRequest):
            assert len(batch) <= 8
            continue
        rows = shared_context_rows([requests[i] for i in batch], 64)
        widths = [packed_length(requests[batch[r[0]]].context, [len(requests[batch[j]].continuation) for j in r])
                  for r in rows]
        assert max(widths) <= 64
        assert len(batch) <= 16 and len(rows) * max(widths) <= 400 or len(rows) == 1
        assert widths == sorted(widths, reverse=True)  # a length bucket, longest first
    split = 0
    for context in set(contexts):  # requests sharing a context share a row, hence a batch, when they fit one
        same = [i for i, r in enumerate(requests) if getattr(r, "context", None) == context]
        if packed_length(context, [len(requests[i].continuation) for i in same]) <= 64:
            assert len({batch_of[i] for i in same}) == 1
        else:
            split += 1
    assert 0 < split < len(set(contexts))  # both cases occur
    assert sorted(len(b) for b in batches if isinstance(requests[b[0]], GenerationRequest)) == [3, 4, 8, 8]
    assert batches == make_batches(list(requests), cfg, 64)  # deterministic


@torch.no_grad()
def plain_loglikelihood(model: llama.Transformer, request: LoglikelihoodRequest) -> float:
    """One request, one ordinary causal forward: the reference the packed rows must reproduce."""
    sequence = torch.tensor([request.context + request.continuation])
    logprobs = model(sequence[:, :-1])[0].double().log_softmax(dim=-1)  # (T, V)
    n = len(request.continuation)
    return float(logprobs[-n:].gather(-1, sequence[0, -n:, None]).sum())


def test_shared_context_matches_one_request_per_choice_on_real_prompts(shared_data, one_thread):
    model_dir = exported_tiny_model()
    tasks = [load_task("arc_easy", TaskSpec(format="arc", path="arc/ARC-Easy-Dev.jsonl", num_fewshot=2,
                                            fewshot_path="arc/ARC-Easy-Train.jsonl"), shared_data, limit=12),
             load_task("winogrande", TaskSpec(format="winogrande", path="winogrande/winogrande.jsonl"),
                       shared_data, limit=8),
             load_task("bpb", TaskSpec(format="text", path="c4_sample/c4_demo.jsonl"), shared_data, limit=2)]
    plan = plan_requests(model_dir, tasks)
    model = hf.load(model_dir).model
    batches = make_batches(plan.requests, RunnerConfig(batch_size=16, max_batch_tokens=4096), model.cfg.max_seq_len)
    packed = {}
    for batch in batches:
        requests = [plan.requests[i] for i in batch]
        assert len(pack(requests, model.cfg.max_seq_len).tokens) < len(requests)  # contexts shared
        packed.update(zip(batch, worker.loglikelihoods(model, requests)))
    errors = [abs(packed[i][0] - plain_loglikelihood(model, r)) for i, r in enumerate(plan.requests)]
    assert max(errors) < 1e-4
    alone = [worker.loglikelihoods(model, [r])[0] for r in plan.requests[:24]]
    assert [g for _, g in alone] == [packed[i][1] for i in range(24)]


def test_prefix_sharing_mask_respects_a_sliding_window(one_thread):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64,
                      max_seq_len=64, sliding_window=6)
    model = llama.build(cfg).eval()
    context = tuple(range(1, 15))
    requests = [LoglikelihoodRequest(context, tuple(range(20, 20 + n))) for n in (1, 4, 9)]
    packed = worker.loglikelihoods(model, requests)
    assert len(pack(requests, 64).tokens) == 1
    for (ll, _), request in zip(packed, requests):
        assert ll == pytest.approx(plain_loglikelihood(model, request), abs=1e-4)


def test_precision_rule():
    assert worker.resolve_precision("auto", "cpu") == torch.float32
    assert worker.resolve_precision("fp32", "cpu") == torch.float32
    assert worker.resolve_precision("bf16", "cpu") == torch.bfloat16
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        assert worker.resolve_precision("auto", "cuda") == expected
    with pytest.raises(ValueError, match="precision"):
        worker.resolve_precision("fp16", "cpu")


def test_bf16_scores_close_to_fp32(shared_data, one_thread):
    model_dir = exported_tiny_model()
    task = load_task("arc_easy", TaskSpec(format="arc", path="arc/ARC-Easy-Dev.jsonl"), shared_data, limit=4)
    plan = plan_requests(model_dir, [task])
    fp32 = worker.ModelWorker(str(model_dir), str(plan.info.tokenizer_file), "cpu", "fp32").run(plan.requests)
    bf16 = worker.ModelWorker(str(model_dir), str(plan.info.tokenizer_file), "cpu", "bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    for (a, _), (b, _) in zip(fp32, bf16.run(plan.requests)):
        assert b == pytest.approx(a, rel=0.05)


def test_the_pool_reports_progress_in_requests(shared_data, caplog, one_thread):
    model_dir = exported_tiny_model()
    task = load_task("arc_easy", TaskSpec(format="arc", path="arc/ARC-Easy-Dev.jsonl"), shared_data, limit=6)
    plan = plan_requests(model_dir, [task])
    cfg = RunnerConfig(num_actors=0)
    pool = WorkerPool(worker_args(model_dir, plan.info, cfg), cfg)
    batches = [plan.requests[:8], plan.requests[8:16], plan.requests[16:]]
    ticks = iter(range(0, 100, 5))  # 5 s per clock reading
    progress = Progress("eval base", len(plan.requests), "requests", logger=logging.getLogger("test.eval"),
                        interval=10, clock=lambda: next(ticks))
    with caplog.at_level(logging.INFO, logger="test.eval"):
        results = pool.map(batches, progress)
        progress.finish()
    assert [len(r) for r in results] == [len(b) for b in batches]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"eval base: 16/{len(plan.requests)} requests (") and "ETA" in lines[0]
    assert lines[-1].startswith(f"eval base: done, {len(plan.requests)} requests")

"""Independent check: llmray's ARC-Easy dev acc / acc_norm equal a direct computation with
``transformers`` (``PreTrainedTokenizerFast`` + ``LlamaForCausalLM``) on the HF export.

The reference below shares nothing with llmray's eval code: it tokenizes with transformers,
runs Hugging Face's Llama implementation on one example's choices at a time (right-padded,
with an attention mask: one sequence per choice, where llmray shares the context) and scores with
plain torch, acc_norm as lm-evaluation-harness defines it (log-likelihood per character of the
choice text). The acceptance bound is 0.5 accuracy points; per-choice log-likelihoods are also
compared.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmray.eval.runner import RunnerConfig, evaluate_model
from llmray.eval.tasks import TaskSpec, load_task
from tests.eval_support import exported_tiny_model


def reference_scores(model_dir, path) -> list[dict]:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos = model.config.bos_token_id
    scores = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        context = f"Question: {record['question']['stem']}\nAnswer:"
        choices = [c["text"] for c in record["question"]["choices"]]
        gold = [c["label"] for c in record["question"]["choices"]].index(record["answerKey"])
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        rows = [[bos] + tokenizer(context + " " + c, add_special_tokens=False)["input_ids"] for c in choices]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        lls = []
        for i, row in enumerate(rows):
            start = 1 + len(context_ids)  # first continuation token
            targets = torch.tensor(row[start:])
            lls.append(float(logprobs[i, start - 1:len(row) - 1].gather(-1, targets[:, None]).sum()))
        per_char = [ll / len(c) for ll, c in zip(lls, choices)]  # lm-evaluation-harness's acc_norm
        scores.append({"lls": lls, "acc": int(max(range(len(lls)), key=lls.__getitem__) == gold),
                       "acc_norm": int(max(range(len(lls)), key=per_char.__getitem__) == gold)})
    return scores


def test_arc_easy_dev_matches_transformers(shared_data, one_thread):
    pytest.importorskip("transformers")
    model_dir = exported_tiny_model()
    path = shared_data / "arc" / "ARC-Easy-Dev.jsonl"
    task = load_task("arc_easy", TaskSpec(format="arc", path=str(path)), shared_data)
    ours = evaluate_model(model_dir, [task], RunnerConfig(num_actors=0, batch_size=64), bootstrap_iters=0)["arc_easy"]
    reference = reference_scores(model_dir, path)
    assert len(ours["scores"]) == len(reference) == 570
    for mine, theirs in zip(ours["scores"], reference):
        assert mine["loglikelihoods"] == pytest.approx(theirs["lls"], abs=2e-3)
    for metric in ("acc", "acc_norm"):
        expected = sum(s[metric] for s in reference) / len(reference)
        assert abs(ours["metrics"][metric]["value"] - expected) <= 0.005, metric

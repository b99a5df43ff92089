"""The model side of evaluation: one loaded checkpoint answering batches of requests.

Design choices:

* :class:`ModelWorker` loads a model directory (HF layout, :func:`llmray.model.hf.load`) and
  its tokenizer once, in its constructor; the runner uses it as-is in-process or wrapped in
  ``ray.remote`` as an actor, so the in-process run is the reference the actor pool must match.
* Log-likelihoods: rows are right-padded (causal attention never lets a real token see the
  padding to its right), inputs longer than ``max_seq_len`` are cut from the left as in
  lm-evaluation-harness, the output head and log-softmax (fp32) run only at the continuation
  positions (the head is most of a small model's FLOPs), and sums are accumulated in fp64.
* Generation is greedy through :func:`llmray.model.generate.stream` (KV cache), stopping a row
  at a stop token, at a stop string in its decoded text, or at its token budget.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmray.eval.prompts import GenerationRequest, LoglikelihoodRequest, Request
from llmray.model import hf
from llmray.model.generate import FINISHED, SamplingConfig, stream
from llmray.model.llama import Transformer


@torch.no_grad()
def loglikelihoods(model: Transformer, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per request."""
    max_len = model.cfg.max_seq_len
    device = next(model.parameters()).device
    sequences = []
    for request in requests:
        if len(request.continuation) > max_len:
            raise ValueError(f"a continuation of {len(request.continuation)} tokens exceeds max_seq_len ({max_len})")
        sequences.append((request.context + request.continuation)[-(max_len + 1):])
    width = max(len(s) for s in sequences) - 1
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)  # (B, T) right-padded inputs
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
    hidden = model(tokens.to(device), return_hidden=True)  # (B, T, dim)
    results = []
    for row, (sequence, request) in enumerate(zip(sequences, requests)):
        n, end = len(request.continuation), len(sequence) - 1
        logprobs = model.output(hidden[row, end - n:end]).float().log_softmax(dim=-1)  # (n, V)
        target = torch.tensor(request.continuation, device=device)  # (n,)
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1)  # (n,)
        results.append((float(picked.double().sum()), bool((logprobs.argmax(dim=-1) == target).all())))
    return results


def cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_until(model: Transformer, tokenizer, requests: list[GenerationRequest]) -> list[str]:
    """Greedy completions, each cut at its first stop string. The requests share their stop tokens."""
    stop_ids = set(requests[0].stop_ids)
    if any(set(r.stop_ids) != stop_ids for r in requests):
        raise ValueError("requests batched for generation must share their stop tokens")
    sampling = SamplingConfig(max_new_tokens=max(r.max_new_tokens for r in requests), temperature=0.0,
                              stop_tokens=sorted(stop_ids))
    generated: list[list[int]] = [[] for _ in requests]
    done = [False] * len(requests)
    for step in stream(model, [list(r.prompt) for r in requests], sampling):
        for row, token in enumerate(step.tolist()):
            if done[row]:
                continue
            request = requests[row]
            if token == FINISHED or token in stop_ids:
                done[row] = True
                continue
            generated[row].append(token)
            text = tokenizer.decode(generated[row])
            done[row] = len(generated[row]) >= request.max_new_tokens or \
                any(s and s in text for s in request.stop_strings)
        if all(done):
            break
    return [cut_at_stop(tokenizer.decode(ids), r.stop_strings) for ids, r in zip(generated, requests)]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ModelWorker:
    """One checkpoint loaded once; :meth:`run` answers a batch of requests of one kind."""

    def __init__(self, model_dir: str, tokenizer_file: str, device: str = "auto", dtype: str = "float32",
                 threads: int | None = None):
        from tokenizers import Tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model = hf.load(Path(model_dir), device=self.device, dtype=getattr(torch, dtype)).model
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))

    def run(self, batch: list[Request]) -> list:
        if isinstance(batch[0], GenerationRequest):
            return generate_until(self.model, self.tokenizer, batch)
        return loglikelihoods(self.model, batch)

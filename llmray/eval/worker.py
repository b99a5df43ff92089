"""The model side of evaluation: one loaded checkpoint answering batches of requests.

Design choices:

* :class:`ModelWorker` loads a model directory (HF layout, :func:`llmray.model.hf.load`) and
  its tokenizer once, in its constructor; the runner uses it as-is in-process or wrapped in
  ``ray.remote`` as an actor, so the in-process run is the reference the actor pool must match.
* Log-likelihoods share their context. Consecutive requests with the same context (the choices
  of one question) become **one packed row**: the context once, then each choice's continuation
  but its last token (the last is only predicted; the first is predicted by the context's last
  position). A prefix-sharing mask lets each choice's tokens attend to the context and to
  themselves only, and their RoPE positions continue from the context's end, so every
  continuation token sees exactly what it sees in a request of its own (the same numbers within
  float rounding, tested at 1e-4 nats in fp32), while the context is computed once instead of
  once per choice and a one-token answer costs nothing beyond it. Chosen over running the
  context once and copying its KV cache for each choice: one forward per batch, no per-choice
  copies of every layer's keys and values, no second pass of short continuations.
* The packed rows and their layout are :mod:`llmray.model.shared_context` (GRPO's learner packs a
  prompt's completions the same way); the layout reaches the model through its forward's
  ``cache`` argument and stores no keys or values, so scoring runs the model's own forward.
* Rows are right-padded; the output head and the log-softmax normalizer (fp32) run only at
  predicting positions, once per position however many choices it predicts (the head is a large
  share of a small model's FLOPs), in chunks that bound the (positions × vocabulary) logits, and
  sums are accumulated in fp64.
* ``precision``: ``fp32``, ``bf16`` (weights and activations; norms, RoPE and the log-softmax
  stay fp32), or ``auto`` = bf16 on a CUDA device that supports it, fp32 on CPU: on this
  project's 2-core Xeon (no AVX512-BF16/AMX) bf16 scoring ran 2.7x slower than fp32.
* Generation is greedy through :func:`llmray.model.generate.stream` (KV cache), stopping a row
  at a stop token, at a stop string in its decoded text, or at its token budget.
"""

from __future__ import annotations

import torch

from llmray import storage
from llmray.eval.prompts import GenerationRequest, LoglikelihoodRequest, Request, fit
from llmray.model import hf, shared_context
from llmray.model.generate import FINISHED, SamplingConfig, stream
from llmray.model.llama import Transformer

HEAD_CHUNK_ELEMENTS = 1 << 24  # logits computed at once: 64 MiB in fp32


@torch.no_grad()
def loglikelihoods(model: Transformer, requests: list[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per request.

    A request longer than the model is cut from the left (:func:`~llmray.eval.prompts.fit`).
    """
    max_len = model.cfg.max_seq_len
    device = next(model.parameters()).device
    packed = shared_context.pack([fit(r, max_len) for r in requests], max_len).to(device)
    hidden = model(packed.tokens, cache=shared_context.SharedContextLayout(packed), return_hidden=True)  # (B, T, dim)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (B·T, dim)
    # the choices of a row are all predicted first from the context's last position: run the head
    # once per distinct predicting position
    where, inverse = torch.unique(packed.rows * packed.tokens.shape[1] + packed.cols, return_inverse=True)
    totals = torch.zeros(len(requests), dtype=torch.float64, device=device)
    misses = torch.zeros(len(requests), dtype=torch.long, device=device)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // model.cfg.vocab_size)
    for start in range(0, len(where), chunk):
        logits = model.output(hidden[where[start:start + chunk]]).float()  # (n, V)
        normalizer, best = logits.logsumexp(dim=-1), logits.argmax(dim=-1)  # (n,), (n,)
        mine = ((inverse >= start) & (inverse < start + chunk)).nonzero().squeeze(-1)  # targets predicted here
        local, target, owner = inverse[mine] - start, packed.targets[mine], packed.owners[mine]
        totals.index_add_(0, owner, (logits[local, target] - normalizer[local]).double())
        misses.index_add_(0, owner, (best[local] != target).long())
    return [(total, miss == 0) for total, miss in zip(totals.tolist(), misses.tolist())]


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


def resolve_precision(precision: str, device: str) -> torch.dtype:
    """The weights' dtype: ``auto`` is bf16 on a CUDA device with bf16 support, else fp32."""
    if precision == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    return PRECISIONS[precision]


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ModelWorker:
    """One checkpoint loaded once; :meth:`run` answers a batch of requests of one kind."""

    def __init__(self, model_dir: str, tokenizer_file: str, device: str = "auto", precision: str = "auto",
                 threads: int | None = None):
        from tokenizers import Tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.model = hf.load(model_dir, device=self.device, dtype=self.dtype).model
        self.tokenizer = Tokenizer.from_str(storage.read_text(tokenizer_file))

    def run(self, batch: list[Request]) -> list:
        if isinstance(batch[0], GenerationRequest):
            return generate_until(self.model, self.tokenizer, batch)
        return loglikelihoods(self.model, batch)

"""Batched sampling with a KV cache, streamed token by token.

Design choices:

* The prompt is run once through the model, filling the KV cache; each later step feeds only the
  newest token (B, 1). Prompts of different lengths are left-padded; the cache masks the padding
  and counts RoPE positions per row, so a row's tokens do not depend on what it is batched with
  (tested against one-at-a-time decoding).
* ``temperature == 0`` is greedy (argmax): deterministic, and equal to recomputing the full
  sequence at every step (tested for 64 tokens). Otherwise logits are divided by the
  temperature, then top-k and top-p (nucleus) filtering keep the most likely tokens, and a token
  is drawn with ``torch.multinomial`` from an optional seeded generator.
* A row stops at its first stop token (which it still emits) or after ``max_new_tokens``; a
  finished row then yields ``-1`` until every row has finished. The length is also capped by the
  model's ``max_seq_len``.
* :func:`stream` is the primitive (one ``(B,)`` tensor per step); :func:`generate` collects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from llmray.config import param
from llmray.model.llama import Transformer

FINISHED = -1


@dataclass
class SamplingConfig:
    max_new_tokens: int = param(128, doc="most tokens to generate per prompt", min=1)
    temperature: float = param(1.0, doc="softmax temperature; 0 = greedy (argmax)", min=0.0)
    top_k: int | None = param(None, doc="sample only among the k most likely tokens; null = all", min=1)
    top_p: float = param(1.0, doc="sample only from the smallest set of tokens whose probability "
                                  "reaches top_p (nucleus); 1 = all", min=0.0, max=1.0)
    stop_tokens: list[int] = param(default_factory=list, doc="token ids that end a completion")
    seed: int | None = param(None, doc="seed of the sampling generator; null = torch's global RNG")

    def __post_init__(self) -> None:
        if self.top_p <= 0.0:
            raise ValueError(f"top_p must be > 0, got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    logits = logits.float()
    if cfg.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model: Transformer, prompts: list[list[int]], cfg: SamplingConfig) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) long, step by step; finished rows yield -1."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    steps = min(cfg.max_new_tokens, model.cfg.max_seq_len - longest)
    if steps <= 0:
        raise ValueError(f"a prompt of {longest} tokens leaves no room to generate within "
                         f"max_seq_len ({model.cfg.max_seq_len})")
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stop = torch.tensor(cfg.stop_tokens, dtype=torch.long, device=device)
    cache = model.new_cache(len(prompts), longest + steps, pad)
    logits = model(tokens, cache=cache)[:, -1]  # (B, V)
    active = torch.ones(len(prompts), dtype=torch.bool, device=device)
    for step in range(steps):
        next_tokens = torch.where(active, sample(logits, cfg, generator), FINISHED)  # (B,)
        yield next_tokens
        active &= ~torch.isin(next_tokens, stop)
        if step == steps - 1 or not active.any():
            return
        logits = model(next_tokens.clamp(min=0)[:, None], cache=cache)[:, -1]


def generate(model: Transformer, prompts: list[list[int]], cfg: SamplingConfig) -> list[list[int]]:
    """Completions (prompt not included, stop token not included) for a batch of prompts."""
    completions: list[list[int]] = [[] for _ in prompts]
    stop = set(cfg.stop_tokens)
    for next_tokens in stream(model, prompts, cfg):
        for row, token in enumerate(next_tokens.tolist()):
            if token != FINISHED and token not in stop:
                completions[row].append(token)
    return completions

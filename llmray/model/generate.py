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
  model's ``max_seq_len``: the cache holds ``longest prompt + steps`` slots (see
  :func:`batch_fits`).
* One :class:`SamplingConfig` applies to every row (one seeded generator for the batch), or a
  list gives each row its own settings: budget, stop tokens, temperature/top-k/top-p and seed.
  This is how a server decodes unrelated requests together. A row with its own seed draws from
  its own generator, so a seeded request samples the same tokens batched or alone; unseeded rows
  with equal settings are sampled together from torch's global RNG.
* A caller may ``send`` a (B,) bool tensor into :func:`stream` to finish rows early (a stop
  string seen in the decoded text, a client gone); they yield ``-1`` from the next step on.
* :func:`stream` is the primitive (one ``(B,)`` tensor per step); :func:`generate` collects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator, Sequence

import torch

from llmray.config import param
from llmray.model.llama import Transformer

if TYPE_CHECKING:
    from llmray.model.hf import SpecialTokens

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


Sampling = SamplingConfig | Sequence[SamplingConfig]


def batch_fits(prompt_lengths: Sequence[int], budgets: Sequence[int], max_seq_len: int) -> bool:
    """Whether prompts decoded together each get their whole budget: left padding makes the batch
    one cache of ``longest prompt + largest budget`` slots, which may not exceed ``max_seq_len``."""
    return max(prompt_lengths) + max(budgets) <= max_seq_len


@dataclass
class _RowGroup:
    """Rows sampled with one call: the same settings and the same random generator."""

    rows: slice | torch.Tensor
    cfg: SamplingConfig
    generator: torch.Generator | None


def _row_groups(cfg: Sampling, configs: list[SamplingConfig], device: torch.device) -> list[_RowGroup]:
    def generator(seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=device).manual_seed(seed)

    if isinstance(cfg, SamplingConfig):
        return [_RowGroup(slice(None), cfg, generator(cfg.seed))]
    members: dict[tuple, list[int]] = {}
    for row, row_cfg in enumerate(configs):
        if row_cfg.temperature == 0.0:
            key: tuple = ("greedy",)
        elif row_cfg.seed is not None:
            key = ("seeded", row)
        else:
            key = (row_cfg.temperature, row_cfg.top_k, row_cfg.top_p)
        members.setdefault(key, []).append(row)
    return [_RowGroup(torch.tensor(rows, device=device), configs[rows[0]],
                      generator(configs[rows[0]].seed if key[0] == "seeded" else None))
            for key, rows in members.items()]


def _sample_rows(logits: torch.Tensor, groups: list[_RowGroup]) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), each group of rows with its own settings."""
    if len(groups) == 1 and isinstance(groups[0].rows, slice):
        return sample(logits, groups[0].cfg, groups[0].generator)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for group in groups:
        tokens[group.rows] = sample(logits[group.rows], group.cfg, group.generator)
    return tokens


def _row_configs(cfg: Sampling, batch: int) -> list[SamplingConfig]:
    if isinstance(cfg, SamplingConfig):
        return [cfg] * batch
    configs = list(cfg)
    if len(configs) != batch:
        raise ValueError(f"{len(configs)} sampling configs for {batch} prompts; give one per prompt or one for all")
    return configs


@torch.no_grad()
def stream(model: Transformer, prompts: list[list[int]],
           cfg: Sampling) -> Generator[torch.Tensor, torch.Tensor | None, None]:
    """Yield the next token of every row, (B,) long, step by step; finished rows yield -1.

    ``cfg`` is one config for all rows or one per row. ``send`` a (B,) bool tensor to finish the
    marked rows early.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    configs = _row_configs(cfg, len(prompts))
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    steps = min(max(c.max_new_tokens for c in configs), model.cfg.max_seq_len - longest)
    if steps <= 0:
        raise ValueError(f"a prompt of {longest} tokens leaves no room to generate within "
                         f"max_seq_len ({model.cfg.max_seq_len})")
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    groups = _row_groups(cfg, configs, device)
    budgets = torch.tensor([c.max_new_tokens for c in configs], device=device)  # (B,)
    width = max(len(c.stop_tokens) for c in configs)
    stop = torch.tensor([list(c.stop_tokens) + [FINISHED] * (width - len(c.stop_tokens)) for c in configs],
                        dtype=torch.long, device=device).reshape(len(configs), width)  # (B, K), -1 = none
    cache = model.new_cache(len(prompts), longest + steps, pad)
    logits = model(tokens, cache=cache)[:, -1]  # (B, V)
    active = torch.ones(len(prompts), dtype=torch.bool, device=device)
    for step in range(steps):
        next_tokens = torch.where(active, _sample_rows(logits, groups), FINISHED)  # (B,)
        finish = yield next_tokens
        active &= ~(next_tokens[:, None] == stop).any(dim=-1) & (budgets > step + 1)
        if finish is not None:
            active &= ~finish.to(device)
        if step == steps - 1 or not active.any():
            return
        logits = model(next_tokens.clamp(min=0)[:, None], cache=cache)[:, -1]


def generate(model: Transformer, prompts: list[list[int]], cfg: Sampling) -> list[list[int]]:
    """Completions (prompt not included, stop token not included) for a batch of prompts."""
    completions: list[list[int]] = [[] for _ in prompts]
    stops = [set(c.stop_tokens) for c in _row_configs(cfg, len(prompts))]
    for next_tokens in stream(model, prompts, cfg):
        for row, token in enumerate(next_tokens.tolist()):
            if token != FINISHED and token not in stops[row]:
                completions[row].append(token)
    return completions


def document_prompt(ids: list[int], special: "SpecialTokens") -> list[int]:
    """Token ids of a raw-text prompt, opened by BOS as every training document is."""
    bos = special.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def document_stop_tokens(special: "SpecialTokens") -> list[int]:
    """Where a raw-text continuation ends: an EOS, or a BOS (documents are BOS-delimited in
    training, so a predicted BOS means the document ended)."""
    return special.eos_token_ids + ([special.bos_token_id] if special.bos_token_id is not None else [])

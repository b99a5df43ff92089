"""Batched sampling with a KV cache, streamed token by token.

Design choices:

* The prompt is run once through the model, filling the KV cache; each later step feeds only the
  newest token (B, 1). Every row of the cache is its own sequence with its own length and RoPE
  positions (prompts are right-padded for the prefill, and padding is never attended), so a
  row's tokens do not depend on what it is batched with (tested against one-at-a-time decoding).
* :class:`Decoder` is the engine: rows join (prefilled while the others continue) and leave
  between steps, all in one forward pass per step. A server keeps one for its lifetime;
  :func:`stream` runs one batch of prompts through a decoder of their own.
* ``temperature == 0`` is greedy (argmax): deterministic, and equal to recomputing the full
  sequence at every step (tested for 64 tokens). Otherwise logits are divided by the
  temperature, then top-k and top-p (nucleus) filtering keep the most likely tokens, and a token
  is drawn with ``torch.multinomial`` from an optional seeded generator.
* A row stops at its first stop token (which it still emits) or after ``max_new_tokens``, capped
  by the model's ``max_seq_len`` for its own prompt; in :func:`stream` a finished row then yields
  ``-1`` until every row has finished.
* One :class:`SamplingConfig` applies to every row (one seeded generator for the batch), or a
  list gives each row its own settings: budget, stop tokens, temperature/top-k/top-p and seed.
  This is how a server decodes unrelated requests together. A row with its own seed draws from
  its own generator (one uniform per step, inverse-CDF, batched with the rows of equal settings),
  so a seeded request samples the same tokens batched or alone; unseeded rows with equal
  settings are sampled together from torch's global RNG.
* A caller may ``send`` a (B,) bool tensor into :func:`stream` to finish rows early (a stop
  string seen in the decoded text, a client gone); they yield ``-1`` from the next step on.
* :func:`stream` is the primitive (one ``(B,)`` tensor per step); :func:`generate` collects it.
* ``Decoder(keep_logps=True)`` keeps each sampled token's log-probability under the model's
  untempered, unfiltered distribution (``Row.logps``): RL's behaviour log-probs, read from the
  logits the step computed anyway instead of a second, teacher-forced pass over the completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


def sample_own_generators(logits: torch.Tensor, cfg: SamplingConfig,
                          generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token ids (B,) of rows that each own a generator, in one batched pass: one uniform draw per
    row from its own generator, then inverse-CDF over the filtered distribution. A row's token
    depends only on its logits and its generator, never on its neighbours (RL samples many seeded
    completions per step; one ``multinomial`` call per row cost as much as the forward pass)."""
    probs = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    uniforms = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(cdf.device)
    # right=True: the first token whose cumulative mass exceeds the draw, so a zero-probability token
    # (a flat step of the CDF) is never chosen
    tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return tokens.clamp(max=logits.shape[-1] - 1)


Sampling = SamplingConfig | Sequence[SamplingConfig]


@dataclass(eq=False)
class Row:
    """One sequence being decoded by a :class:`Decoder`: its prompt, settings and progress."""

    prompt: list[int]
    cfg: SamplingConfig
    generator: torch.Generator | None  # None: torch's global RNG (or greedy)
    budget: int  # tokens it may generate: its max_new_tokens, capped by the model's max_seq_len
    owns_generator: bool = False  # its generator is its own (seeded by its cfg), not shared with other rows
    generated: int = 0
    finished: bool = False  # by a stop token, its budget, or :meth:`Decoder.finish`
    last_token: int = FINISHED  # fed to the model at the next step
    logps: list[float] = field(default_factory=list)  # of each token sampled (``Decoder(keep_logps=True)``)

    def sampling_key(self) -> tuple:
        """Rows with equal keys are sampled with one call (greedy rows, rows of one shared generator, or
        rows that each own a generator and have equal settings)."""
        if self.cfg.temperature == 0.0:
            return ("greedy",)
        source = "own" if self.owns_generator else id(self.generator)
        return (source, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)


class Decoder:
    """Sequences decoding side by side in one KV cache; they join and leave between steps.

    :meth:`add` queues a prompt; each :meth:`step` drops the finished rows (later rows move
    into freed ones, so the rows in use stay contiguous), feeds every continuing row its last
    token in one forward pass, prefills the rows added since the last step (right-padded, in a
    second pass) and samples one token per row. Every row has its own slots and positions, so
    its tokens do not depend on what it decodes with. The cache grows (doubling, at most
    ``max_seq_len`` slots) as longer requests arrive.
    """

    def __init__(self, model: Transformer, max_rows: int, max_len: int = 64, keep_logps: bool = False) -> None:
        self.model = model
        self.max_rows = max_rows
        self.keep_logps = keep_logps
        self.cache = model.new_cache(max_rows, min(max_len, model.cfg.max_seq_len))
        self.rows: list[Row] = []  # self.rows[i] lives in cache row i
        self._added: list[Row] = []  # queued, prefilled at the next step

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.rows) - len(self._added)

    def add(self, prompt: list[int], cfg: SamplingConfig, generator: torch.Generator | None = None) -> Row:
        """Queue a prompt; it is prefilled and gets its first token at the next :meth:`step`.
        Without ``generator`` a seeded ``cfg`` gets its own."""
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        room = self.model.cfg.max_seq_len - len(prompt)
        if room <= 0:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room to generate within "
                             f"max_seq_len ({self.model.cfg.max_seq_len})")
        if self.free_rows == 0:
            raise ValueError(f"all {self.max_rows} rows of the decoder are in use")
        owns = generator is None and cfg.seed is not None and cfg.temperature > 0.0
        if owns:
            generator = torch.Generator(device=self.cache.device).manual_seed(cfg.seed)
        row = Row(list(prompt), cfg, generator, min(cfg.max_new_tokens, room), owns_generator=owns)
        self._added.append(row)
        return row

    def finish(self, row: Row) -> None:
        """Stop decoding ``row``: it costs nothing from the next step on."""
        row.finished = True
        if row in self._added:
            self._added.remove(row)

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int]]:
        """One token for every row still decoding, in row order; [] when none is."""
        self._drop_finished()
        logits = []
        if self.rows:
            fed = torch.tensor([[row.last_token] for row in self.rows], device=self.cache.device)
            logits.append(self.model(fed, cache=self.cache.rows(0, len(self.rows)))[:, -1])
        if self._added:
            logits.append(self._prefill(self._added))
            self.rows += self._added
            self._added = []
        if not self.rows:
            return []
        logits = torch.cat(logits)
        sampled = _sample_rows(logits, self.rows)
        tokens = sampled.tolist()
        if self.keep_logps:
            chosen = torch.log_softmax(logits.float(), dim=-1).gather(-1, sampled[:, None]).squeeze(-1)
            for row, logp in zip(self.rows, chosen.tolist()):
                row.logps.append(logp)
        for row, token in zip(self.rows, tokens):
            row.last_token = token
            row.generated += 1
            row.finished = row.finished or token in row.cfg.stop_tokens or row.generated >= row.budget
        return list(zip(self.rows, tokens))

    def _drop_finished(self) -> None:
        kept: list[Row] = []
        for source, row in enumerate(self.rows):
            if row.finished:
                continue
            if source != len(kept):
                self.cache.move_row(source, len(kept))
            kept.append(row)
        self.rows = kept

    def _prefill(self, added: list[Row]) -> torch.Tensor:
        """Run the new rows' prompts into the rows after the continuing ones; their last logits (N, V)."""
        start = len(self.rows)
        lengths = [len(row.prompt) for row in added]
        needed = max(len(row.prompt) + row.budget for row in added)
        if needed > self.cache.max_len:
            self.cache.grow(min(max(needed, 2 * self.cache.max_len), self.model.cfg.max_seq_len))
        for index in range(start, start + len(added)):
            self.cache.reset_row(index)
        longest = max(lengths)
        tokens = torch.tensor([row.prompt + [0] * (longest - len(row.prompt)) for row in added],
                              device=self.cache.device)  # right-padded: the padding is never attended
        out = self.model(tokens, cache=self.cache.rows(start, start + len(added)))  # (N, T, V)
        for index, length in enumerate(lengths):
            self.cache.lengths[start + index] = length
        last = torch.tensor(lengths, device=out.device) - 1
        return out[torch.arange(len(added), device=out.device), last]


def _sample_rows(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): rows with one sampling key in one call."""
    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row.sampling_key(), []).append(index)
    if len(groups) == 1:
        return _sample_group(logits, rows)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for members in groups.values():
        index = torch.tensor(members, device=logits.device)
        tokens[index] = _sample_group(logits[index], [rows[i] for i in members])
    return tokens


def _sample_group(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Tokens of rows with one sampling key: per-row draws when each owns its generator."""
    first = rows[0]
    if first.owns_generator:  # only sampled rows own one (greedy rows have the greedy key)
        return sample_own_generators(logits, first.cfg, [row.generator for row in rows])
    return sample(logits, first.cfg, first.generator)


def _row_configs(cfg: Sampling, batch: int) -> list[SamplingConfig]:
    if isinstance(cfg, SamplingConfig):
        return [cfg] * batch
    configs = list(cfg)
    if len(configs) != batch:
        raise ValueError(f"{len(configs)} sampling configs for {batch} prompts; give one per prompt or one for all")
    return configs


def stream(model: Transformer, prompts: list[list[int]],
           cfg: Sampling) -> Generator[torch.Tensor, torch.Tensor | None, None]:
    """Yield the next token of every row, (B,) long, step by step; finished rows yield -1.

    ``cfg`` is one config for all rows (seeded: one generator for the batch) or one per row.
    ``send`` a (B,) bool tensor to finish the marked rows early.
    """
    configs = _row_configs(cfg, len(prompts))
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    shared = None  # one generator for a batch under one seeded config; a single prompt owns its own
    if isinstance(cfg, SamplingConfig) and cfg.seed is not None and cfg.temperature > 0.0 and len(prompts) > 1:
        shared = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    decoder = Decoder(model, len(prompts), max(len(p) + c.max_new_tokens for p, c in zip(prompts, configs)))
    rows = [decoder.add(prompt, row_cfg, shared) for prompt, row_cfg in zip(prompts, configs)]
    while True:
        stepped = dict(decoder.step())
        if not stepped:
            return
        finish = yield torch.tensor([stepped.get(row, FINISHED) for row in rows])
        if finish is not None:
            for row, done in zip(rows, finish.tolist()):
                if done:
                    decoder.finish(row)
        if all(row.finished for row in rows):
            return


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

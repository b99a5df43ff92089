"""DPO rows: each preference pair rendered twice (prompt + chosen, prompt + rejected) by the chat template.

* The completion is the final assistant turn only: its content and its closing ``<|end|>``
  (``ChatTemplate.render``'s assistant mask with every prompt token zeroed; earlier assistant turns
  in the prompt are context, not scored).
* A pair longer than ``seq_len + 1`` tokens loses its oldest prompt turns (whole turns, the prompt
  still starting with a user turn) until both sequences fit; a pair that cannot fit is dropped
  and counted.
* Sequences are stored right-padded in one (2N, seq_len + 1) array: rows 0..N-1 chosen, N..2N-1
  rejected. A batch is cut to its longest sequence; right padding never changes a causal model's
  log-probs of earlier tokens, so reference log-probs computed in any batching apply.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmray.align.loader import fingerprint_arrays
from llmray.align.packing import IGNORE_INDEX
from llmray.align.preferences import Pair
from llmray.tokenizer.chat import ChatTemplate


@dataclass
class PairRows:
    tokens: np.ndarray  # (2N, L) int64, right-padded
    completion: np.ndarray  # (2N, L) bool: token belongs to the scored reply
    lengths: np.ndarray  # (2N,) int64
    pair_ids: list[str]
    reference_logps: np.ndarray | None = None  # (2N,) float64, set by reference.py

    def __len__(self) -> int:
        return len(self.pair_ids)

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint_arrays(self.tokens, self.completion, self.lengths)

    def sequences(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """``inputs``/``targets`` (n, T) of sequence rows (0 ≤ index < 2N), cut to the longest."""
        indices = np.asarray(indices, dtype=np.int64)
        width = int(self.lengths[indices].max())
        tokens, completion = self.tokens[indices, :width], self.completion[indices, :width]
        targets = np.where(completion[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        return {"inputs": tokens[:, :-1], "targets": targets}

    def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """A DPO micro-batch of pairs ``rows`` (-1 = empty pair): chosen rows, then rejected rows."""
        if self.reference_logps is None:
            raise ValueError("reference log-probs are not computed yet (llmray.align.reference)")
        rows = np.asarray(rows, dtype=np.int64)
        valid = rows >= 0
        pairs = np.where(valid, rows, 0)
        indices = np.concatenate([pairs, pairs + len(self)])
        batch = self.sequences(indices)
        batch["targets"] = np.where(np.concatenate([valid, valid])[:, None], batch["targets"], IGNORE_INDEX)
        batch["reference_logps"] = self.reference_logps[indices]
        batch["valid"] = valid.astype(np.int64)
        return batch


@dataclass
class EncodeStats:
    pairs: int = 0
    shortened: int = 0
    dropped_overlong: int = 0


def _render(template: ChatTemplate, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    prompt_len = len(template.render(prompt).ids)
    ids, mask = template.render(prompt + [{"role": "assistant", "content": reply}])
    return ids, [0] * prompt_len + mask[prompt_len:]


def encode_pairs(pairs: Sequence[Pair], template: ChatTemplate, seq_len: int,
                 pad_id: int) -> tuple[PairRows, list[Pair], EncodeStats]:
    """Rows of every pair that fits (oldest prompt turns dropped as needed); returns the kept pairs too."""
    row_len = seq_len + 1
    chosen, rejected, kept, stats = [], [], [], EncodeStats()
    for pair in pairs:
        prompt = list(pair.prompt)
        shortened = False
        while True:
            c, r = _render(template, prompt, pair.chosen), _render(template, prompt, pair.rejected)
            if max(len(c[0]), len(r[0])) <= row_len:
                break
            prompt = prompt[1:]
            while prompt and prompt[0]["role"] != "user":
                prompt = prompt[1:]
            shortened = True
            if not prompt:
                break
        if not prompt:
            stats.dropped_overlong += 1
            continue
        stats.shortened += shortened
        stats.pairs += 1
        chosen.append(c)
        rejected.append(r)
        kept.append(pair)
    if not kept:
        raise ValueError(f"no preference pair fits in seq_len {seq_len} ({stats.dropped_overlong} dropped)")
    sequences = chosen + rejected
    tokens = np.full((len(sequences), row_len), pad_id, dtype=np.int64)
    completion = np.zeros((len(sequences), row_len), dtype=bool)
    lengths = np.zeros(len(sequences), dtype=np.int64)
    for i, (ids, mask) in enumerate(sequences):
        tokens[i, :len(ids)] = ids
        completion[i, :len(ids)] = np.asarray(mask, dtype=bool)
        lengths[i] = len(ids)
    return PairRows(tokens, completion, lengths, [p.id for p in kept]), kept, stats

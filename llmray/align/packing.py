"""SFT rows: conversations rendered by the chat template and packed into ``seq_len + 1`` tokens.

Design choices:

* **Rendering** is :meth:`llmray.tokenizer.chat.ChatTemplate.render`, the one chat contract: its
  ``assistant_mask`` (assistant content + its closing ``<|end|>``) is the loss mask.
* **Rows of ``seq_len + 1`` tokens**: inputs are ``row[:-1]``, targets ``row[1:]``, and a target
  counts only where the mask is 1. A conversation of ``L`` tokens (BOS included) takes ``L`` slots.
* **Best-fit decreasing**: conversations sorted longest first go into the open row with the
  least room that still fits them (a new row when none does). A conversation that fits in a row
  is never split across rows, and each appears in exactly one row (tested). Overlong
  conversations (``L > seq_len + 1``) are dropped or truncated (``overlong``), and counted.
  Packing is done once; epochs shuffle the order of the rows (``loader.py``).
* **No attention across conversations**: each row carries ``segment_ids``; the model turns them
  into a block-diagonal causal mask and per-conversation RoPE positions (``llama.document_mask``),
  so a packed conversation computes exactly what it would alone (tested). This is an explicit
  boolean mask through ``scaled_dot_product_attention``, which every backend supports (CPU
  math/flash-CPU kernels, CUDA memory-efficient kernel); it costs a (B, 1, T, T) bool per step and
  rules out the CUDA flash kernel, which only knows ``is_causal``. Padding slots form their own
  segment and are never targets.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

from llmray.align.loader import fingerprint_arrays
from llmray.tokenizer.chat import ChatTemplate

IGNORE_INDEX = -100  # same value as llmray.train.objectives.IGNORE_INDEX (which imports torch)


@dataclass
class Rendered:
    ids: np.ndarray  # (L,) int64
    mask: np.ndarray  # (L,) bool, True on assistant-produced tokens


@dataclass
class RenderStats:
    """What one rendering pass did (written to the stage's data.json)."""

    conversations: int = 0  # rendered and kept
    dropped_overlong: int = 0  # longer than a row, overlong=drop
    truncated: int = 0  # longer than a row, cut to fit (overlong=truncate)
    tokens: int = 0  # in the kept conversations
    assistant_tokens: int = 0  # of those, targets of the loss


def render_all(conversations: Iterable[Sequence[dict]], template: ChatTemplate, row_len: int,
               overlong: Literal["drop", "truncate"] = "drop") -> tuple[list[Rendered], RenderStats]:
    """Render message lists; those longer than ``row_len`` tokens are dropped or cut to ``row_len``."""
    out, stats = [], RenderStats()
    for messages in conversations:
        ids, mask = template.render(messages)
        if len(ids) > row_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, mask = ids[:row_len], mask[:row_len]
            if not any(mask[1:]):
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
        out.append(Rendered(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        stats.conversations += 1
        stats.tokens += len(ids)
        stats.assistant_tokens += int(sum(mask))
    return out, stats


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, best-fit decreasing; every item (each ≤ capacity) in exactly one bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index) of open bins
    for item in order:
        size = lengths[item]
        if size > capacity:
            raise ValueError(f"item {item} of length {size} exceeds the capacity {capacity}")
        at = bisect.bisect_left(free, (size, -1))  # the bin with the least room that still fits
        if at == len(free):
            bins.append([item])
            room, index = capacity - size, len(bins) - 1
        else:
            room, index = free.pop(at)
            bins[index].append(item)
            room -= size
        if room > 0:
            bisect.insort(free, (room, index))
    return bins


@dataclass
class PackedRows:
    """R rows of ``row_len`` tokens: ids, loss mask (over the *token*), segment ids, member list."""

    tokens: np.ndarray  # (R, row_len) int64
    loss_mask: np.ndarray  # (R, row_len) bool: the token is a target that counts
    segment_ids: np.ndarray  # (R, row_len) int64
    members: list[list[int]]  # conversation indices in each row, in placement order

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint_arrays(self.tokens, self.loss_mask, self.segment_ids)

    def fill(self) -> float:
        """Share of row slots holding conversation tokens (the rest is padding)."""
        members = np.array([len(m) for m in self.members])[:, None]
        return float((self.segment_ids < members).mean())

    def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """{"inputs", "targets", "segment_ids"}, each (B, row_len - 1); row -1 is an all-padding row."""
        rows = np.asarray(rows, dtype=np.int64)
        real = rows >= 0
        take = np.where(real, rows, 0)
        tokens, mask, segments = self.tokens[take], self.loss_mask[take] & real[:, None], self.segment_ids[take]
        targets = np.where(mask[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        return {"inputs": tokens[:, :-1], "targets": targets, "segment_ids": segments[:, :-1]}


def pack(examples: Sequence[Rendered], row_len: int, pad_id: int) -> PackedRows:
    bins = best_fit([len(e.ids) for e in examples], row_len)
    tokens = np.full((len(bins), row_len), pad_id, dtype=np.int64)
    loss_mask = np.zeros((len(bins), row_len), dtype=bool)
    segments = np.zeros((len(bins), row_len), dtype=np.int64)
    for r, members in enumerate(bins):
        start = 0
        for s, index in enumerate(members):
            example = examples[index]
            end = start + len(example.ids)
            tokens[r, start:end] = example.ids
            loss_mask[r, start:end] = example.mask
            segments[r, start:end] = s
            start = end
        segments[r, start:] = len(members)  # padding: a segment of its own, never a target
    return PackedRows(tokens, loss_mask, segments, bins)


def pack_conversations(conversations: Iterable[Sequence[dict]], template: ChatTemplate, seq_len: int,
                       pad_id: int, overlong: Literal["drop", "truncate"] = "drop") -> tuple[PackedRows, RenderStats]:
    """Render and pack: rows of ``seq_len + 1`` tokens."""
    examples, stats = render_all(conversations, template, seq_len + 1, overlong)
    if not examples:
        raise ValueError(f"no conversation left to pack (seq_len {seq_len}, {stats.dropped_overlong} "
                         "dropped as overlong)")
    return pack(examples, seq_len + 1, pad_id), stats


"""Rows that hold a context once and several continuations of it, for scoring or training them.

Why: eval's multiple-choice questions score every choice after one context, and GRPO trains
G completions of one prompt. Run one sequence per continuation and the context's tokens go
through every layer G times; at RL's shapes (a 20-token prompt, 8 completions of up to 16
tokens) that is over half of the learner's tokens.

* A row is the context, then each continuation but its last token (the first is predicted by the
  context's last position, the last is only predicted). ``segments`` marks the context 0, the
  k-th continuation k and padding -1; RoPE positions of every continuation restart at the
  context's end.
* :class:`SharedContextLayout` reaches ``Transformer.forward`` through its ``cache`` argument
  (how KV-cache decoding hands it positions and a mask): a query attends to the context and to
  its own continuation, causally (and within a sliding window), so every token sees exactly what
  it sees in a sequence of its own. It stores no keys or values, so the model's own forward runs,
  and gradients flow as usual: the context's keys and values receive the gradients of every
  continuation that read them.
* ``rows`` / ``cols`` / ``targets`` / ``owners`` list each predicted token (N of them): where it
  is predicted, the token, and the index of the continuation it belongs to, in input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F


class ContextAndContinuation(Protocol):
    context: Sequence[int]
    continuation: Sequence[int]


@dataclass
class SharedContextRows:
    """Continuations packed into right-padded rows, and where each continuation token is predicted."""

    tokens: torch.Tensor  # (B, T) ids, 0 at padding
    positions: torch.Tensor  # (B, T) RoPE positions
    segments: torch.Tensor  # (B, T) 0 context, k >= 1 the row's k-th continuation, -1 padding
    rows: torch.Tensor  # (N,) row of each predicting position
    cols: torch.Tensor  # (N,) its column
    targets: torch.Tensor  # (N,) the token it predicts
    owners: torch.Tensor  # (N,) index of the continuation the token belongs to

    def to(self, device: torch.device) -> "SharedContextRows":
        return SharedContextRows(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


class SharedContextLayout:
    """:class:`SharedContextRows` as ``Transformer.forward``'s ``cache``: positions and mask, nothing stored."""

    def __init__(self, packed: SharedContextRows):
        self.packed = packed

    def positions(self, new: int) -> torch.Tensor:
        return self.packed.positions

    def mask(self, new: int, window: int | None) -> torch.Tensor:
        """(B, 1, T, T) bool: query i may attend key j of its row (context-sharing, causal, windowed)."""
        positions, segments = self.packed.positions, self.packed.segments
        q_pos, k_pos = positions[:, :, None], positions[:, None, :]
        q_seg, k_seg = segments[:, :, None], segments[:, None, :]
        allowed = (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg)) & (k_pos <= q_pos)
        if window is not None:
            allowed &= q_pos - k_pos < window
        return allowed[:, None]  # padding queries see the context's first token: finite, unused

    def advance(self, new: int) -> None:
        pass

    def layer(self, name: str) -> "SharedContextLayout":
        return self  # every layer's "cache": nothing stored

    @staticmethod
    def update(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new keys and values straight back: the packed rows are all there is to attend to."""
        return k, v


def packed_length(context: Sequence[int], continuation_lengths: list[int]) -> int:
    """Tokens of a row holding ``context`` once and each continuation but its last token."""
    return len(context) + sum(n - 1 for n in continuation_lengths)


def shared_context_rows(items: Sequence[ContextAndContinuation], max_row_tokens: int) -> list[list[int]]:
    """Indices of ``items`` grouped into rows, in order: consecutive items with the same context share
    a row (the context is computed once) while it stays within ``max_row_tokens``; an item alone
    always gets a row."""
    rows: list[list[int]] = []
    length = 0  # of the last row
    for i, item in enumerate(items):
        tail = len(item.continuation) - 1
        if rows and tuple(items[rows[-1][0]].context) == tuple(item.context) and length + tail <= max_row_tokens:
            rows[-1].append(i)
            length += tail
        else:
            rows.append([i])
            length = len(item.context) + tail
    return rows


def pack(items: Sequence[ContextAndContinuation], max_row_tokens: int, pad_id: int = 0) -> SharedContextRows:
    """The rows of :func:`shared_context_rows`, as tensors, right-padded with ``pad_id`` (never attended).
    Every context and continuation needs a token."""
    tokens, positions, segments = [], [], []
    rows, cols, targets, owners = [], [], [], []
    for row, members in enumerate(shared_context_rows(items, max_row_tokens)):
        context = list(items[members[0]].context)
        if not context:
            raise ValueError("a continuation needs at least one context token")
        ids, pos, seg = list(context), list(range(len(context))), [0] * len(context)
        for k, i in enumerate(members, start=1):
            continuation = list(items[i].continuation)
            if not continuation:
                raise ValueError(f"item {i} has an empty continuation: nothing to predict")
            tail = len(continuation) - 1
            cols += [len(context) - 1] + list(range(len(ids), len(ids) + tail))
            ids += continuation[:-1]
            pos += range(len(context), len(context) + tail)
            seg += [k] * tail
            rows += [row] * len(continuation)
            targets += continuation
            owners += [i] * len(continuation)
        tokens.append(ids)
        positions.append(pos)
        segments.append(seg)
    width = max(len(ids) for ids in tokens)

    def padded(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    return SharedContextRows(padded(tokens, pad_id), padded(positions, 0), padded(segments, -1),
                             *(torch.tensor(v, dtype=torch.long) for v in (rows, cols, targets, owners)))


def continuation_logps(model: torch.nn.Module, packed: SharedContextRows) -> torch.Tensor:
    """(N,) fp32 log-probability of each continuation token (``packed.targets``), in one forward of
    ``model`` over the rows (the head runs inside the forward, where FSDP2 has gathered it)."""
    logits = model(packed.tokens, cache=SharedContextLayout(packed))  # (B, T, V)
    return -F.cross_entropy(logits[packed.rows, packed.cols].float(), packed.targets, reduction="none")

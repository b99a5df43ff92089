"""Attention within each document of packed rows, without a (T × T) mask.

Reference: SDPA with the dense block-diagonal causal mask (``document_mask``). Checked within
1e-5 (fp32) on rows of 3-4 documents of unequal lengths, forward and gradients, with grouped-query
heads; at the model level, a packed row equals each of its documents run alone; and no (T, T)
tensor is created on the way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llmray.model import llama
from llmray.model.config import preset
from llmray.model.packed_attention import DocumentLayout

TOL = 1e-5
SEGMENTS = torch.tensor([[0] * 10 + [1] * 5 + [2] * 25,
                         [0] * 13 + [1] * 13 + [2] * 14,
                         [0] * 3 + [1] * 30 + [2] * 2 + [3] * 5])


def test_equals_the_dense_mask_reference_forward_and_backward():
    torch.manual_seed(0)
    B, T = SEGMENTS.shape
    q = torch.randn(B, 4, T, 16, requires_grad=True)
    k, v = (torch.randn(B, 2, T, 16, requires_grad=True) for _ in range(2))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=llama.document_mask(SEGMENTS, None),
                                               enable_gqa=True)
    packed = DocumentLayout(SEGMENTS).attend(q, k, v)
    weights = torch.randn_like(reference)
    ref_grads = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    grads = torch.autograd.grad((packed * weights).sum(), (q, k, v))
    assert (packed - reference).abs().max() < TOL
    assert all((a - b).abs().max() < TOL for a, b in zip(grads, ref_grads))


class SquareShapes(TorchDispatchMode):
    """Shapes of every tensor an operator returns whose last two dimensions are (size, size)."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.seen = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.dim() >= 2 and tuple(leaf.shape[-2:]) == (self.size,) * 2:
                self.seen.append(tuple(leaf.shape))
        return out


def test_a_packed_row_equals_its_documents_run_alone_and_builds_no_square_mask():
    torch.manual_seed(0)
    model = llama.build(preset("tiny", vocab_size=300, max_seq_len=64))
    B, T = SEGMENTS.shape
    tokens = torch.randint(0, 300, (B, T))
    with SquareShapes(T) as squares:
        packed = model(tokens, segment_ids=SEGMENTS)
    assert squares.seen == []
    for row in range(B):
        for segment in SEGMENTS[row].unique():
            where = (SEGMENTS[row] == segment).nonzero().squeeze(1)
            alone = model(tokens[row, where][None])[0]
            assert (packed[row, where] - alone).abs().max() < TOL


def test_the_dense_path_it_replaced_did_build_a_square_mask():
    """The check above can fail: the sliding-window path (which keeps the dense mask) is seen."""
    model = llama.build(preset("tiny", vocab_size=300, max_seq_len=64, sliding_window=16))
    B, T = SEGMENTS.shape
    with SquareShapes(T) as squares:
        model(torch.randint(0, 300, (B, T)), segment_ids=SEGMENTS)
    assert squares.seen

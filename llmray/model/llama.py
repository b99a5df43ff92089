"""The Transformer: a decoder-only Llama-3 / Mistral-style language model in plain PyTorch.

Design choices, all of them in this one file:

* Pre-norm residual blocks: ``h = x + attention(norm(x))``, ``out = h + feed_forward(norm(h))``,
  a final norm, then the output head. RMSNorm computed in fp32 and cast back. No biases.
* Rotary position embeddings in the *rotate-half* layout: the first and the second half of a
  head are the two coordinates of each rotated pair. That is the layout of Hugging Face Llama
  checkpoints, so export/import are pure renames (no permutation of ``wq``/``wk``). cos/sin are
  computed in fp32 from the positions at each forward (a few thousand trig ops, no buffer: nothing
  to materialize after ``meta``, nothing that ``model.to(bfloat16)`` could round).
  Optional Llama-3.1 frequency scaling (long wavelengths stretched, short ones kept).
* Grouped-query attention: ``n_kv_heads`` key/value heads, kv head ``g`` serving query heads
  ``g·r … g·r+r−1`` (``r = n_heads / n_kv_heads``), through
  ``F.scaled_dot_product_attention(enable_gqa=True)`` (no copies of k/v).
* Training attention uses ``is_causal=True`` (flash / memory-efficient kernels on GPU). An explicit
  boolean mask is built only for sliding-window attention longer than the window, for
  KV-cache decoding (queries at an offset, rows at their own lengths), and for rows packing several
  documents under a sliding window. Rows packing several documents (``segment_ids``) otherwise
  attend through :class:`~llmray.model.packed_attention.DocumentLayout` (each document causal on
  its own, no (T, T) mask); their positions restart per document.
* Optional QK-norm: an RMSNorm over each query and key head (one weight vector of ``head_dim``
  shared by all heads) before RoPE, as in Qwen3.
* SwiGLU feed-forward: ``w2(silu(w1·x) * w3·x)``.
* GPT-2 components for the baseline recipe (``mlp: gelu``, ``norm: layernorm``): a GELU MLP
  without ``w3`` and LayerNorm with a bias, on the same RoPE attention, so the baseline and the
  recipe differ only in what is compared. Such models train everywhere but have no Llama layout
  to export to (see :mod:`llmray.model.hf`).
* Optional tied embeddings: ``output.weight`` *is* ``tok_embeddings.weight``.
* ``head=score`` (a reward model): the output head maps each position to one scalar, V = 1.
* Layers live in an ``nn.ModuleDict`` keyed ``"0"``, ``"1"``, …: parameter names such as
  ``layers.3.attention.wq.weight`` stay the same when a pipeline stage deletes the layers it does
  not own (``del model.layers["3"]``) and sets ``tok_embeddings`` / ``norm`` / ``output`` to
  ``None``; such a stage takes hidden states ``(B, T, dim)`` in and/or gives them out.
* Build on the ``meta`` device, then ``to_empty`` and :meth:`Transformer.init_weights` (see
  :func:`build`): normal(0, init_std) everywhere, residual output projections (``wo``, ``w2``) at
  ``init_std / sqrt(2·n_layers)`` (GPT-2 / Megatron scaled residual init), norm weights 1, biases
  0; each parameter drawn per block of rows from (seed, its name), so a sharded run can
  initialize only its shards and get the same weights (:mod:`~llmray.model.param_init`).
* No distributed code here: parallelism is applied from outside to this plain module.

Shapes: B batch, T new tokens, S attended slots (T, or everything in the KV cache),
H query heads, KV key/value heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmray.model.config import ModelConfig, RopeScaling
from llmray.model import param_init
from llmray.model.linear_cross_entropy import cross_entropy_sum, linear_cross_entropy
from llmray.model.packed_attention import DocumentLayout


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


class LayerNorm(nn.Module):
    """LayerNorm with a bias (GPT-2's norm, for the baseline recipe), computed in fp32 like RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return self.weight * normed + self.bias


def block_norm(cfg: ModelConfig) -> RMSNorm | LayerNorm:
    """The norm of the blocks and the final norm, as ``cfg.norm`` says (QK-norm is always RMSNorm)."""
    return (LayerNorm if cfg.norm == "layernorm" else RMSNorm)(cfg.dim, cfg.norm_eps)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) of the rotated pairs, with optional Llama-3.1 scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / theta ** exponents
    if scaling is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    long_wavelength = scaling.original_max_seq_len / scaling.low_freq_factor
    short_wavelength = scaling.original_max_seq_len / scaling.high_freq_factor
    # 0 for wavelengths past long_wavelength (fully scaled) ... 1 below short_wavelength (unchanged)
    smooth = ((scaling.original_max_seq_len / wavelength - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > long_wavelength, inv_freq / scaling.factor, inv_freq)
    middle = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(middle, interpolated, scaled)


def rope_rotation(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (*positions.shape, head_dim/2) fp32, of position × frequency."""
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) by cos/sin (B or 1, 1, T, D/2) in the rotate-half layout, in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each (B, heads, T, D/2): the two coordinates of a pair
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def sliding_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True where query i may attend key j: j <= i and i - j < window."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (i - j < window)


def document_mask(segment_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) bool for packed rows: causal (and windowed) attention inside each document only.

    segment_ids (B, T): documents are contiguous runs of equal ids.
    """
    T = segment_ids.shape[1]
    causal = sliding_window_mask(T, window or T, segment_ids.device)  # (T, T)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class Linear(nn.Linear):
    """``nn.Linear`` (no bias here) whose few-row inference products on CPU run as ``(W·xᵀ)ᵀ``.

    MKL's fp32 GEMM ``x·Wᵀ`` falls off a cliff between 16 and ~56 rows: a decode step of 16
    requests through ``cpu-small``'s shapes took 3.9 ms of GEMM as ``x·Wᵀ`` and 2.0 ms as
    ``(W·xᵀ)ᵀ`` (2 threads, Intel Xeon, AVX-512; below 16 and from 56 rows the plain product is
    as fast or faster). Same arithmetic, so only the speed changes; training (autograd), sharded
    weights (DTensor) and other devices always take the plain path.
    """

    SKINNY_ROWS = range(16, 56)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (rows in self.SKINNY_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled()
                and type(self.weight) is nn.Parameter and self.bias is None):
            product = torch.mm(self.weight, x.reshape(rows, self.in_features).t())  # (out, rows)
            return product.t().contiguous().view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | DocumentLayout | None, cache: "LayerCache | None") -> torch.Tensor:
        B, T, _ = x.shape
        # view with -1 heads, so a tensor-parallel shard uses its local head count
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, KV, D)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, KV, S, D): every filled slot, these T included
        if isinstance(mask, DocumentLayout):
            y = mask.attend(q, k, v)  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=q.shape[1] != k.shape[1])  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H·D)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1·x) * w3·x); with ``cfg.mlp == "gelu"`` GPT-2's w2(gelu(w1·x)) (no w3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_hidden_dim, bias=False)  # gate (GELU: up)
        self.w3 = Linear(cfg.dim, cfg.ffn_hidden_dim, bias=False) if cfg.mlp == "swiglu" else None  # up
        self.w2 = Linear(cfg.ffn_hidden_dim, cfg.dim, bias=False)  # down (residual output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x), approximate="tanh"))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = block_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = block_norm(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: "LayerCache | None" = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer for rows that are each their own sequence, at their own length.

    Row ``b`` holds its tokens in slots ``0 … lengths[b]-1``, so its RoPE positions are its slot
    indices and the sliding window applies to slot distances. Rows never see each other: a server
    decodes unrelated requests side by side, prefills a newcomer into a free row while the others
    continue, and moves a row into a finished one's place (:meth:`move_row`), all in one cache.
    The model reads and writes a contiguous range of rows at a time (:meth:`rows`).
    Lengths are kept on the host as well, so sizing the attended slots never waits for the device.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, layer_names: list[str],
                 device: torch.device | str, dtype: torch.dtype):
        self.cfg, self.batch_size = cfg, batch_size
        self._check_fits(max_len)
        self.max_len = max_len
        self.device, self.dtype = torch.device(device), dtype
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.keys = {name: torch.zeros(shape, device=device, dtype=dtype) for name in layer_names}
        self.values = {name: torch.zeros(shape, device=device, dtype=dtype) for name in layer_names}
        self.lengths = [0] * batch_size  # slots filled, per row

    def rows(self, start: int = 0, stop: int | None = None) -> "CacheRows":
        """The rows ``start … stop-1`` (all by default), as the model reads and writes them."""
        return CacheRows(self, start, self.batch_size if stop is None else stop)

    def grow(self, max_len: int) -> None:
        """Room for ``max_len`` slots per row (kept contents), at most the model's ``max_seq_len``."""
        if max_len <= self.max_len:
            return
        self._check_fits(max_len)
        for store in (self.keys, self.values):
            for name, old in store.items():
                store[name] = torch.zeros(*old.shape[:2], max_len, old.shape[3], device=self.device, dtype=self.dtype)
                store[name][:, :, :self.max_len] = old
        self.max_len = max_len

    def _check_fits(self, max_len: int) -> None:
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"KV cache of {max_len} slots exceeds max_seq_len ({self.cfg.max_seq_len})")

    def move_row(self, source: int, target: int) -> None:
        """Put row ``source``'s sequence in row ``target`` (whose sequence is dropped)."""
        filled = self.lengths[source]
        for store in (self.keys, self.values):
            for tensor in store.values():
                tensor[target, :, :filled] = tensor[source, :, :filled]
        self.lengths[target] = filled

    def reset_row(self, row: int) -> None:
        """Empty row ``row`` for a new sequence."""
        self.lengths[row] = 0


class CacheRows:
    """A contiguous range of a :class:`KVCache`'s rows: what one forward pass reads and extends."""

    def __init__(self, cache: KVCache, start: int, stop: int):
        self.cache, self.start, self.stop = cache, start, stop
        self._lengths = cache.lengths[start:stop]
        self._length_tensor = torch.tensor(self._lengths, device=cache.device)  # (B,)

    def positions(self, new: int) -> torch.Tensor:
        """(B, T) RoPE positions of the next ``new`` slots of each row."""
        return self._length_tensor[:, None] + torch.arange(new, device=self.cache.device)[None, :]

    def attended(self, new: int) -> int:
        """S: slots the next ``new`` queries attend over (the longest row's, these included)."""
        return max(self._lengths) + new

    def mask(self, new: int, window: int | None) -> torch.Tensor:
        """(B, 1, T, S) bool: the slots each of the next ``new`` queries may attend to, its own
        earlier ones and itself (inside the window). Slots past a row's length are never seen."""
        q = self.positions(new)[:, :, None]  # (B, T, 1)
        k = torch.arange(self.attended(new), device=self.cache.device)[None, None, :]
        allowed = k <= q
        if window is not None:
            allowed &= q - k < window
        return allowed[:, None]

    def update(self, name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, KV, T, D) after each row's filled slots; return every attended
        slot (B, KV, S, D)."""
        new = k.shape[2]
        end = self.attended(new)
        if end > self.cache.max_len:
            raise ValueError(f"KV cache full: {end} slots needed, {self.cache.max_len} allocated")
        keys = self.cache.keys[name][self.start:self.stop]
        values = self.cache.values[name][self.start:self.stop]
        if len(set(self._lengths)) == 1:  # every row at the same length: one slice write
            at = self._lengths[0]
            keys[:, :, at:at + new] = k
            values[:, :, at:at + new] = v
        else:
            rows = torch.arange(len(self._lengths), device=self.cache.device)[:, None]  # (B, 1)
            slots = self.positions(new)  # (B, T)
            keys[rows, :, slots] = k.transpose(1, 2)  # indexed as (B, T, KV, D)
            values[rows, :, slots] = v.transpose(1, 2)
        return keys[:, :, :end], values[:, :, :end]

    def layer(self, name: str) -> "LayerCache":
        return LayerCache(self, name)

    def advance(self, new: int) -> None:
        """Count ``new`` more filled slots in every row of the range."""
        for row in range(self.start, self.stop):
            self.cache.lengths[row] += new


class LayerCache:
    """One layer's view of a :class:`CacheRows`: the attention stores and reads its k, v here."""

    def __init__(self, rows: CacheRows, name: str):
        self.rows, self.name = rows, name

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows.update(self.name, k, v)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # built on meta (see build), then filled by param_init; an explicit weight skips Embedding's own
        # normal_ init, whose meta kernel alone imports torch's Python decompositions (0.5 s per process)
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(
            cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | LayerNorm | None = block_norm(cfg)
        self.output: nn.Linear | None = Linear(cfg.dim, cfg.output_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make ``output.weight`` the embedding matrix when tied and both live here.

        Called again after ``to_empty``, which gives each module its own new parameter.
        """
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def init_rule(self, name: str) -> param_init.Rule:
        """How parameter ``name`` starts (see the module docstring): norm weights 1, biases 0, the
        residual output projections N(0, init_std / sqrt(2·n_layers)), every other matrix N(0, init_std)."""
        if name.endswith(".bias"):
            return param_init.Rule("zeros")
        if name.split(".")[-2].endswith("norm"):  # attention_norm, ffn_norm, norm, q_norm, k_norm
            return param_init.Rule("ones")
        if name.endswith(("wo.weight", "w2.weight")):
            return param_init.Rule("normal", self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers))
        return param_init.Rule("normal", self.cfg.init_std)

    def init_weights(self, seed: int) -> None:
        """Initialize every parameter this module holds from ``seed`` (:mod:`~llmray.model.param_init`):
        the same values whichever layout holds which part."""
        self.tie_weights()
        param_init.initialize(self, param_init.seeded(seed, self.init_rule))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for this model's layers, on its device and in its dtype."""
        weight = next(self.parameters())
        return KVCache(self.cfg, batch_size, max_len, list(self.layers.keys()), weight.device, weight.dtype)

    def forward(self, tokens: torch.Tensor, cache: KVCache | CacheRows | None = None,
                return_hidden: bool = False, segment_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, z_loss: float = 0.0) -> torch.Tensor:
        """tokens (B, T) ids → logits (B, T, V); with ``targets`` (B, T), the summed loss instead.

        A pipeline stage without ``tok_embeddings`` takes hidden states (B, T, dim) instead, and
        one without ``output`` returns hidden states. ``return_hidden`` returns the final-normed
        hidden states (B, T, dim) instead of logits (for chunked losses or value heads).
        With ``cache`` (a whole :class:`KVCache`, a range of its rows, or anything with their
        ``positions``/``mask``/``layer``/``advance``, as eval's packed layout) row ``b`` of the
        tokens continues the cached sequence of that row and its keys/values are appended to it.
        ``segment_ids`` (B, T) marks documents packed into one row (SFT packing): each attends
        only to itself and counts positions from its own start. ``targets`` (ids, ``-100`` where
        not counted) returns the summed cross-entropy (+ ``z_loss``) from the head fused with the
        loss (:mod:`~llmray.model.linear_cross_entropy`): the full logits are never materialized.
        It runs inside ``forward`` so that FSDP2 has gathered the head's weight.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, dim)
        T = h.shape[1]
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len ({self.cfg.max_seq_len})")
            positions = torch.arange(T, device=h.device)[None]  # (1, T)
            window = self.cfg.sliding_window
            mask = sliding_window_mask(T, window, h.device) if window and T > window else None
            if segment_ids is not None:  # packed documents: no (T, T) mask unless a window needs one
                layout = DocumentLayout(segment_ids)
                positions = layout.positions()  # counted from each document's first token
                mask = document_mask(segment_ids, window) if window and T > window else layout
        else:
            if isinstance(cache, KVCache):
                cache = cache.rows()
            positions = cache.positions(T)  # (B, T)
            mask = cache.mask(T, self.cfg.sliding_window)  # (B, 1, T, S)
        cos, sin = rope_rotation(self.cfg, positions)  # each (B or 1, T, D/2)
        rope = (cos[:, None], sin[:, None])  # broadcast over heads
        for name, layer in self.layers.items():
            h = layer(h, rope, mask, cache.layer(name) if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        if self.norm is not None:
            h = self.norm(h)
        if return_hidden or self.output is None:
            return h
        if targets is not None:
            return self.loss(h, targets, z_loss)
        return self.output(h)  # (B, T, V)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, z_loss: float) -> torch.Tensor:
        """Summed loss of the head on final hidden states ``h``, fused and chunked; a tensor-parallel
        head (a DTensor weight sharded on the vocabulary) computes it on its rows of the vocabulary."""
        weight = self.output.weight
        if not param_init.is_dtensor(weight):
            return linear_cross_entropy(h, weight, targets, z_loss)
        from torch.distributed.tensor import DTensor, Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh, placements = weight.device_mesh, weight.placements
        if mesh.ndim != 1 or placements != (Shard(0),):
            return cross_entropy_sum(self.output(h), targets, z_loss)  # a layout the head's own forward handles
        if isinstance(h, DTensor):  # sequence parallelism: the head's input is sharded on the sequence
            h = h.redistribute(h.device_mesh, [Replicate()]).to_local()
        offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)[1][0]
        return linear_cross_entropy(h, weight.to_local(), targets, z_loss, vocab_group=mesh.get_group(),
                                    vocab_offset=offset)


def build(cfg: ModelConfig, device: torch.device | str = "cpu", *, init: bool = True,
          dtype: torch.dtype | None = None, seed: int | None = None) -> Transformer:
    """Construct on ``meta`` (no allocation), materialize on ``device``, then initialize from ``seed``.

    ``seed=None`` draws the seed from torch's global generator (so ``torch.manual_seed`` before
    ``build`` fixes the weights). ``init=False`` leaves the weights uninitialized memory (ties set
    up) for a caller that loads a state dict next. ``device="meta"`` returns the bare meta model
    (shapes and counts, no memory): sharded runs parallelize it, then :func:`param_init.materialize`.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    if init:
        model.init_weights(int(torch.randint(2 ** 62, ())) if seed is None else seed)
    else:
        model.tie_weights()
    return model.to(dtype) if dtype is not None else model

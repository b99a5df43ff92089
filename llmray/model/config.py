"""ModelConfig: the shape of the Transformer, its named presets, exact parameter and FLOP counts.

Design choices:

* One small dataclass with a documented ``param`` per field, so ``configs/model/*.yaml`` validate
  through :func:`llmray.config.from_dict` and every key shows in ``--help``.
* Derived fields (``n_kv_heads``, ``head_dim``, ``ffn_hidden_dim``) may be left ``null`` and are
  resolved in ``__post_init__``; the resolved config is what gets saved, so a saved config
  always spells the full shape.
* One knob: ``depth`` alone derives the shape (``dim = depth × aspect_ratio``, 64-wide heads,
  ``n_kv_heads = n_heads / kv_group``); every preset is also this rule with its own aspect ratio,
  head width, group size and ``ffn_ratio`` (a test holds the table).
* Presets are plain ``ModelConfig`` values in :data:`PRESETS`; ``configs/model/<name>.yaml``
  spells the same values (a test checks they agree).
* :meth:`ModelConfig.num_params` is a closed form (checked against ``sum(p.numel())`` for every
  preset); :meth:`ModelConfig.flops_per_token` is the PaLM (Chowdhery et al. 2022, appendix B)
  training estimate ``6·N + 12·L·H·Q·T`` used for MFU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from llmray.config import param


@dataclass
class RopeScaling:
    """Llama-3.1 RoPE frequency scaling: long wavelengths are stretched by ``factor``."""

    factor: float = param(8.0, doc="divide the inverse frequencies of long wavelengths by this", min=1.0)
    low_freq_factor: float = param(1.0, doc="wavelengths above original_max_seq_len/low_freq_factor "
                                            "are fully scaled", min=0.0)
    high_freq_factor: float = param(4.0, doc="wavelengths below original_max_seq_len/high_freq_factor "
                                             "are left alone; between the two they are interpolated",
                                    min=0.0)
    original_max_seq_len: int = param(8192, doc="context length the unscaled model was trained at",
                                      min=1)

    def __post_init__(self) -> None:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be greater "
                             f"than low_freq_factor ({self.low_freq_factor})")


@dataclass
class ModelConfig:
    """Shape and options of a decoder-only Llama-style Transformer."""

    vocab_size: int = param(32000, doc="number of token ids (embedding rows / logits)", min=1)
    depth: int | None = param(None, doc="the one knob: n_layers = depth, and dim, n_heads and n_kv_heads left "
                                        "null are derived from it (dim = depth × aspect_ratio, n_heads = dim / "
                                        "head_dim, n_kv_heads = n_heads / kv_group); null = give dim, n_layers "
                                        "and n_heads", min=1)
    aspect_ratio: float = param(64.0, doc="with depth: model width per layer (dim = round(depth × aspect_ratio))",
                                min=1.0)
    kv_group: int = param(1, doc="with depth: query heads per key/value head (n_kv_heads = n_heads / kv_group)",
                          min=1)
    dim: int | None = param(None, doc="model (residual stream) width; null = derived from depth", min=1)
    n_layers: int | None = param(None, doc="number of Transformer blocks; null = depth", min=1)
    n_heads: int | None = param(None, doc="query heads per attention layer; null = derived from depth", min=1)
    n_kv_heads: int | None = param(None, doc="key/value heads (grouped-query attention); null = n_heads, or "
                                             "n_heads / kv_group with depth", min=1)
    head_dim: int | None = param(None, doc="width of one head; null = dim // n_heads (64 with depth)", min=2)
    ffn_hidden_dim: int | None = param(
        None, doc="feed-forward hidden width; null = ffn_ratio·dim rounded up to a multiple of ffn_multiple_of",
        min=1)
    ffn_ratio: float | None = param(None, doc="default ffn_hidden_dim / dim before rounding; null = 8/3 for "
                                              "SwiGLU (the parameters of a 4·dim GELU MLP), 4 for GELU", min=0.0)
    mlp: Literal["swiglu", "gelu"] = param("swiglu", doc="feed-forward: swiglu (Llama) or gelu (GPT-2: "
                                                         "w2(gelu(w1·x)), the baseline recipe)")
    norm: Literal["rmsnorm", "layernorm"] = param("rmsnorm", doc="block and final norms: rmsnorm (Llama) or "
                                                                 "layernorm with bias (GPT-2, the baseline recipe)")
    ffn_multiple_of: int = param(256, doc="rounding of the default ffn_hidden_dim", min=1)
    norm_eps: float = param(1e-5, doc="RMSNorm epsilon", min=0.0)
    rope_theta: float = param(10000.0, doc="RoPE base period", min=1.0)
    rope_scaling: RopeScaling | None = param(None, doc="Llama-3.1 RoPE frequency scaling; null = none")
    max_seq_len: int = param(2048, doc="longest sequence (RoPE table size, KV-cache limit)", min=1)
    qk_norm: bool = param(False, doc="RMSNorm each query and key head before RoPE (as in Qwen3/OLMo2)")
    tie_embeddings: bool = param(False, doc="share the token embedding matrix with the output head")
    head: Literal["lm", "score"] = param("lm", doc="lm: next-token logits over the vocabulary; score: one scalar "
                                                   "per position (a reward model; Hugging Face "
                                                   "LlamaForSequenceClassification with num_labels 1)")
    sliding_window: int | None = param(
        None, doc="attend only to the last this-many positions, the current one included (Mistral); "
                  "null = full causal attention", min=1)
    init_std: float = param(0.02, doc="std of the normal init; residual output projections use "
                                      "init_std / sqrt(2·n_layers)", min=0.0)

    def __post_init__(self) -> None:
        if self.depth is not None:
            self._derive_from_depth()
        missing = [name for name in ("dim", "n_layers", "n_heads") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"give depth, or all of dim, n_layers and n_heads (missing: {', '.join(missing)})")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head == "score" and self.tie_embeddings:
            raise ValueError("head=score has no vocabulary projection to tie to the embedding: set tie_embeddings false")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "when head_dim is not given")
            self.head_dim = self.dim // self.n_heads
        if self.ffn_hidden_dim is None:
            hidden = (8 * self.dim / 3 if self.mlp == "swiglu" else 4 * self.dim) if self.ffn_ratio is None \
                else self.ffn_ratio * self.dim
            self.ffn_hidden_dim = self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    def _derive_from_depth(self) -> None:
        """The one-knob family (as nanochat's): width grows linearly with depth at a fixed head width.

        Fields given explicitly win over the rule (as ``head_dim`` and ``ffn_hidden_dim`` do), so
        a saved, fully resolved config loads back unchanged; only ``n_layers`` must equal ``depth``.
        """
        if self.n_layers is not None and self.n_layers != self.depth:
            raise ValueError(f"n_layers ({self.n_layers}) must equal depth ({self.depth}) or be left out")
        self.n_layers = self.depth
        if self.dim is None:
            self.dim = round(self.depth * self.aspect_ratio)
        if self.head_dim is None and self.n_heads is None:
            self.head_dim = DEPTH_HEAD_DIM
        if self.n_heads is None:
            if self.dim % self.head_dim:
                raise ValueError(f"depth {self.depth} × aspect_ratio {self.aspect_ratio} gives dim {self.dim}, "
                                 f"not a multiple of head_dim {self.head_dim}")
            self.n_heads = self.dim // self.head_dim
        if self.n_kv_heads is None:
            if self.n_heads % self.kv_group:
                raise ValueError(f"n_heads ({self.n_heads}) must be divisible by kv_group ({self.kv_group})")
            self.n_kv_heads = self.n_heads // self.kv_group

    # ------------------------------------------------------------------------------------------
    # Counts
    # ------------------------------------------------------------------------------------------

    def params_per_layer(self) -> int:
        """Parameters of one Transformer block."""
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = self.dim * q_out + 2 * self.dim * kv_out + q_out * self.dim  # wq, wk, wv, wo
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        feed_forward = (3 if self.mlp == "swiglu" else 2) * self.dim * self.ffn_hidden_dim  # w1, w2 (, w3)
        norms = 2 * self.norm_params()  # attention_norm, ffn_norm
        return attention + qk_norm + feed_forward + norms

    def norm_params(self) -> int:
        """Parameters of one block or final norm: a weight (and a bias for LayerNorm)."""
        return self.dim * (2 if self.norm == "layernorm" else 1)

    @property
    def output_size(self) -> int:
        """Width of the output head: the vocabulary (head=lm) or one score (head=score)."""
        return self.vocab_size if self.head == "lm" else 1

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count (each tied matrix counted once).

        ``include_embedding=False`` leaves out the token-embedding table (a lookup, not a matmul)
        but keeps the output head, tied or not, because it is a real matmul: this is the ``N`` of
        :meth:`flops_per_token`.
        """
        embedding = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.output_size * self.dim
        total = self.n_layers * self.params_per_layer() + self.norm_params() + head  # + final norm
        if include_embedding:
            return total + embedding
        return total + (embedding if self.tie_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        PaLM appendix B: ``6·N + 12·L·H·Q·T`` where ``N = num_params(include_embedding=False)``
        (every matmul weight, the output head included; the embedding lookup excluded), L layers,
        H query heads of width Q, and T the attended context: ``seq_len``, or the sliding window
        when that is shorter. As in PaLM the attention term does not halve for the causal mask.
        """
        context = min(seq_len, self.sliding_window) if self.sliding_window else seq_len
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * context
        return 6 * self.num_params(include_embedding=False) + attention


DEPTH_HEAD_DIM = 64  # head width of the depth family unless head_dim is given


def _llama3_scaling(factor: float) -> RopeScaling:
    return RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)


# Presets hold the fields as given (derived fields unresolved), so an override of ``dim`` or
# ``n_heads`` re-derives ``head_dim`` and ``ffn_hidden_dim`` instead of keeping stale values.
PRESETS: dict[str, dict] = {
    # Unit tests and the embedded smoke pipeline: < 1M parameters.
    "tiny": dict(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=192,
                 max_seq_len=256, tie_embeddings=True),
    # The CPU demo: ~12.6M parameters, trains at a useful rate on 2 cores in fp32.
    "cpu-small": dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_hidden_dim=1024,
                      max_seq_len=512, tie_embeddings=True),
    # GPT-2 small class (124M) with Llama components; vocab padded to a multiple of 64.
    "gpt2-124m": dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, ffn_hidden_dim=2048,
                      max_seq_len=1024, tie_embeddings=True),
    # Llama-3.2-1B shape (1.24B).
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192,
               rope_theta=500000.0, rope_scaling=_llama3_scaling(32.0), max_seq_len=8192, tie_embeddings=True),
    # Llama-3.1-8B shape (8.03B published).
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336,
                      rope_theta=500000.0, rope_scaling=_llama3_scaling(8.0), max_seq_len=8192),
    # Llama-3.1-70B shape (70.55B published).
    "llama3-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden_dim=28672,
                       rope_theta=500000.0, rope_scaling=_llama3_scaling(8.0), max_seq_len=8192),
}


def preset(name: str, **overrides) -> ModelConfig:
    """Preset ``name`` with ``overrides`` applied; derived fields are re-derived unless overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})

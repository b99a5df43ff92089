"""Helpers shared by the eval tests: a tiny exported model with a real BPE tokenizer, a toy bigram model.

``exported_tiny_model`` trains a 1024-token byte-level BPE (the chat special tokens first, as
the project's tokenizers have them) on ~300 KB of real text from shared/data, builds the
'tiny' preset with a fixed seed and exports both in HF layout, once per test session.

``bigram_model`` is a Transformer whose output is a hand-written bigram table: one-hot
embeddings, attention and feed-forward outputs zeroed (each block is the identity), RMSNorm
without epsilon (a one-hot row normalizes to ``√dim`` times itself) and an output head of
``table.T / √dim``, so the logits after token ``t`` are exactly ``table[t]``.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from llmray.model import hf, llama
from llmray.model.config import ModelConfig, preset
from llmray.tokenizer import chat
from tests.conftest import SHARED_DATA


def train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(chat.SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": chat.BOS, "eos_token": chat.EOS,
        "pad_token": chat.PAD}))
    return directory


@functools.lru_cache(maxsize=None)
def exported_tiny_model(seed: int = 0) -> Path:
    """A model directory (config.json, model.safetensors, tokenizer.json) of the 'tiny' preset."""
    root = Path(tempfile.mkdtemp(prefix="llmray-eval-model-"))
    atexit.register(shutil.rmtree, root, True)
    text = (SHARED_DATA / "wikipedia_sample" / "wiki_demo.txt").read_text(encoding="utf-8")[:200_000]
    arc = (SHARED_DATA / "arc" / "ARC-Easy-Train.jsonl").read_text(encoding="utf-8")[:100_000]
    tokenizer_dir = save_tokenizer(train_bpe(text.splitlines() + arc.splitlines(), 1024), root / "tokenizer")
    torch.manual_seed(seed)
    cfg = preset("tiny")
    model = llama.build(cfg)
    return hf.export(root / "model", cfg, model.state_dict(), tokenizer_dir=tokenizer_dir)


def bigram_model(table: torch.Tensor) -> llama.Transformer:
    """A Transformer computing logits ``table[previous token]`` (table: (V, V))."""
    vocab = table.shape[0]
    cfg = ModelConfig(vocab_size=vocab, dim=vocab, n_layers=1, n_heads=1, head_dim=vocab, ffn_hidden_dim=4,
                      norm_eps=0.0, max_seq_len=64, tie_embeddings=False)
    model = llama.build(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.tok_embeddings.weight.copy_(torch.eye(vocab))
        model.norm.weight.fill_(1.0)
        for layer in model.layers.values():
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        model.output.weight.copy_(table.T / math.sqrt(vocab))
    return model.eval()


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer with the chat special tokens first, then ``words``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(list(chat.SPECIAL_TOKENS) + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=chat.PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer

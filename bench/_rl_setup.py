"""What the RL benches share: a tokenizer trained on GSM8K solutions and a small random Llama in HF layout."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from llmray.model import hf, llama
from llmray.model.config import preset
from llmray.tokenizer import train as tokenizer_train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tokenizer(root: Path, vocab: int) -> Path:
    """A BPE tokenizer on 2,000 GSM8K solutions (general text: at small vocabularies most numbers
    stay split into digits, which lets a small model learn arithmetic digit by digit)."""
    with gzip.open(SHARED / "gsm8k" / "train.jsonl.gz", "rt") as handle:
        texts = [json.loads(line)["answer"] for line, _ in zip(handle, range(2000))]
    directory = root / "tokenizer"
    tokenizer_train.save(tokenizer_train.train_tokenizer(iter([texts]), vocab), directory)
    return directory


def initial_model(root: Path, tokenizer_dir: Path, vocab: int, dim: int, layers: int, seed: int = 0) -> Path:
    """A randomly initialised Llama (``dim`` wide, ``layers`` deep, 96-token context) in HF layout."""
    cfg = preset("tiny", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2,
                 ffn_hidden_dim=3 * dim, max_seq_len=96)
    torch.manual_seed(seed)
    return hf.export(root / "init", cfg, llama.build(cfg).state_dict(), tokenizer_dir=tokenizer_dir)

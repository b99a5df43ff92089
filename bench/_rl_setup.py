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


VAL_FRACTION = 0.1  # held-out share of problems (split by expression, as the rl stage splits)
SEED = 0


def worked(problem) -> str:
    """The demonstration reply of an arithmetic problem: "47 + 3 = 50"."""
    return f"{problem.messages[0]['content'].removeprefix('What is ').removesuffix('?')} = {problem.answer}"


def sft_model(root: Path, args) -> tuple[Path, Path]:
    """(tokenizer, SFT model): a random Llama SFT'd by the ``sft`` stage (in process) on worked answers
    to the first ``args.sft_problems`` training-split problems of ``args.level``, for ``args.sft_steps``.

    The defaults (400 of level 2's 811 training problems, 300 steps at lr 1e-3) give a start that
    partly generalizes (in a probe: greedy held-out 37%, pass@8 52%), which RL can sharpen. 150
    demonstrations at lr 3e-3 were memorized (held-out 6-10%, pass@8 11%), and RL on them then
    mostly memorized its training problems too (+4.5 and +6.7 held-out points in 900 and 300
    steps)."""
    from llmray import config as config_lib
    from llmray import stages
    from llmray.align.records import split_of
    from llmray.rl.tasks import arithmetic_problems

    tokenizer_dir = tokenizer(root, args.vocab)
    init = initial_model(root, tokenizer_dir, args.vocab, args.dim, args.layers, SEED)
    problems = arithmetic_problems(args.problems, args.level, SEED)
    demos = [p for p in problems if split_of(p.group, VAL_FRACTION, SEED) == "train"][:args.sft_problems]
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [*p.messages, {"role": "assistant", "content": worked(p)}]})
                            + "\n" for p in demos))
    cfg = config_lib.from_dict(stages.STAGES["sft"].config_cls, {
        "model": str(init), "tokenizer": str(tokenizer_dir), "val_fraction": 0.0,
        "sources": [{"kind": "messages", "path": str(data), "name": "arithmetic"}],
        "batch": {"seq_len": 95, "micro_batch_size": 32},
        "train": {"steps": args.sft_steps, "log_every": 50, "optimizer": {"lr": args.sft_lr, "weight_decay": 0.0},
                  "schedule": {"warmup_steps": 20}},
        "samples": {"prompts": 0}, "execution": {"threads_per_worker": 2}})
    return tokenizer_dir, stages.run_stage(stages.STAGES["sft"], cfg, root / "runs").output / "model"


def arguments(description: str, quick_rl_steps: int, full_rl_steps: int, add_options=None):
    """The options both RL benches take (task, SFT, RL, model), plus a bench's own
    (``add_options(parser)``); ``--quick`` shortens RL."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer RL steps (under 5 minutes)")
    parser.add_argument("--level", type=int, default=2, help="arithmetic difficulty (llmray.rl.tasks)")
    parser.add_argument("--problems", type=int, default=900, help="distinct problems drawn (level 2 has 900)")
    parser.add_argument("--sft-problems", type=int, default=400, help="training problems given as SFT demonstrations")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--rl-steps", type=int, default=None, help=f"default {quick_rl_steps} (--quick), else "
                                                                  f"{full_rl_steps}")
    parser.add_argument("--rl-lr", type=float, default=3e-4)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--eval-problems", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    if add_options:
        add_options(parser)
    args = parser.parse_args()
    args.rl_steps = args.rl_steps or (quick_rl_steps if args.quick else full_rl_steps)
    return args

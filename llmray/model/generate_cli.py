"""``llmray generate`` and ``llmray chat``: sample from a model directory, streaming the text.

A model directory is anything :func:`llmray.model.hf.load` reads: ``config.json`` +
``model.safetensors`` in Hugging Face layout, with the ``tokenizer.json`` it was trained with
(an ``hf.export`` output, or the exported weights of a training checkpoint). The tokenizer is read
with ``tokenizers``; ``transformers`` is not needed.

* ``generate`` continues raw text prompts. The prompt starts with the model's BOS token, and a
  completion ends at the model's EOS token(s) or at a BOS (training documents are BOS-delimited, so
  a predicted BOS means the document ended), unless ``--stop-token`` says otherwise. One prompt
  streams; several run as one batch and print in order.
* ``chat`` renders the conversation with the project's one chat template
  (:mod:`llmray.tokenizer.chat`), generates the assistant turn until ``<|end|>``, and keeps the
  history, dropping the oldest turns when it no longer fits in ``max_seq_len``.
* Text is printed as soon as the decoded ids form complete characters (a byte-level BPE token can
  end inside a UTF-8 sequence).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

INCOMPLETE_CHARACTER = "\ufffd"


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True,
                        help="model directory: config.json + model.safetensors + tokenizer.json")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; default: %(default)s")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus mass; default: %(default)s")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights dtype; default: %(default)s")


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="continue text prompts with a trained model",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sampling_args(parser)
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch")
    parser.add_argument("--stop-token", type=int, action="append", default=None,
                        help="token id that ends a completion; repeatable (default: the model's EOS and BOS)")
    parser.set_defaults(handler=run_generate)


def add_chat_parser(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model on stdin/stdout (chat template)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sampling_args(parser)
    parser.add_argument("--system", default=None, help="system message opening the conversation")
    parser.set_defaults(handler=run_chat)


# ---------------------------------------------------------------------------------------------

class TextStream:
    """Turns ids arriving one by one into the text they add, holding back incomplete characters."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._shown = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.text
        return "" if text.endswith(INCOMPLETE_CHARACTER) else self._advance(text)

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character the model never completed)."""
        return self._advance(self.text)

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self.ids, skip_special_tokens=True)

    def _advance(self, text: str) -> str:
        new, self._shown = text[self._shown:], len(text)
        return new


def _load(args):
    import torch
    from tokenizers import Tokenizer

    from llmray.model import hf

    tokenizer_path = args.model / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise SystemExit(f"llmray {args.command}: {args.model} has no tokenizer.json")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pretrained = hf.load(args.model, device=device, dtype=getattr(torch, args.dtype))
    except (FileNotFoundError, hf.HFFormatError) as exc:
        raise SystemExit(f"llmray {args.command}: {exc}") from None
    return pretrained, Tokenizer.from_file(str(tokenizer_path))


def _sampling(args, stop_tokens: list[int]):
    from llmray.model.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, stop_tokens=stop_tokens, seed=args.seed)


def _stream_text(model, prompt_ids: list[int], cfg, tokenizer, out) -> str:
    from llmray.model.generate import stream

    text = TextStream(tokenizer)
    stop = set(cfg.stop_tokens)
    for next_tokens in stream(model, [prompt_ids], cfg):
        token = int(next_tokens[0])
        if token in stop:
            break
        out.write(text.push(token))
        out.flush()
    out.write(text.finish())
    return text.text


def run_generate(args) -> int:
    from llmray.model.generate import generate

    pretrained, tokenizer = _load(args)
    special = pretrained.special_tokens
    document_end = special.eos_token_ids + ([special.bos_token_id] if special.bos_token_id is not None else [])
    cfg = _sampling(args, args.stop_token if args.stop_token is not None else document_end)
    prompts = []
    for prompt in args.prompt:
        ids = tokenizer.encode(prompt).ids
        if special.bos_token_id is not None and ids[:1] != [special.bos_token_id]:
            ids = [special.bos_token_id] + ids
        prompts.append(ids)
    if len(prompts) == 1:
        _stream_text(pretrained.model, prompts[0], cfg, tokenizer, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for completion in generate(pretrained.model, prompts, cfg):
        sys.stdout.write(tokenizer.decode(completion, skip_special_tokens=True) + "\n")
    return 0


def run_chat(args) -> int:
    from llmray.tokenizer.chat import ChatTemplate

    pretrained, tokenizer = _load(args)
    template = ChatTemplate(tokenizer)
    cfg = _sampling(args, list(template.stop_ids))
    max_prompt = pretrained.config.max_seq_len - 1
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = template.render(messages, add_generation_prompt=True).ids
        while len(ids) > max_prompt and len(messages) > 1 + bool(args.system):
            del messages[int(bool(args.system))]  # forget the oldest turn
            ids = template.render(messages, add_generation_prompt=True).ids
        if len(ids) > max_prompt:
            print(f"llmray chat: the message alone is {len(ids)} tokens; the model's context is "
                  f"{pretrained.config.max_seq_len}", file=sys.stderr)
            messages.pop()
            continue
        if interactive:
            sys.stdout.write("model> ")
        reply = _stream_text(pretrained.model, ids, cfg, tokenizer, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})

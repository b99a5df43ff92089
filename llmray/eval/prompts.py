"""Examples -> token-level requests: few-shot prefixes, plain or chat-template prompts, windows.

Design choices:

* Everything the model is asked is one of two requests: the **log-likelihood** of continuation
  tokens given context tokens (multiple choice, LAMBADA, bits-per-byte), or a greedy
  **generation** from a prompt (GSM8K). Requests are plain token tuples, built once in the
  driver, so that any worker (in-process, CPU or GPU actor) computes exactly the same thing.
* Context/continuation split as lm-evaluation-harness does it: trailing spaces of the context
  move into the continuation, ``context + continuation`` is encoded whole, and the continuation
  tokens are what follows the context's own tokens. The context starts with the model's BOS
  (its EOS when it has none), so the first continuation token always has something to condition on.
* Few-shot demonstrations are drawn per example by a ``random.Random`` seeded with
  ``"{seed}/{task}/{index}"``: the same prompts whichever worker or order builds them, and an
  example never demonstrates itself.
* Chat models (``chat=True``) are prompted through THE chat template
  (:mod:`llmray.tokenizer.chat`): each demonstration is a user turn (context) and an assistant
  turn (answer), the question a final user turn, then the assistant header; the continuation is
  the bare answer text. Generation then also stops at the end-of-turn token.
* A request longer than the model's ``max_seq_len + 1`` tokens (the last one is only predicted)
  loses context tokens from the left, as in lm-evaluation-harness (:func:`fit`); requests are
  built already fitted, so the batches the runner forms are the ones the workers compute.
* Held-out text is cut into windows of at most ``max_seq_len`` predicted tokens; each window is
  conditioned on the tokens just before it (one token, or more for the last, shorter window),
  as lm-evaluation-harness's rolling log-likelihood does, so every token is predicted once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Union

from llmray.eval.tasks import Example, Task


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.context) + len(self.continuation)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    stop_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt) + self.max_new_tokens


Request = Union[LoglikelihoodRequest, GenerationRequest]


class PromptError(ValueError):
    """An example cannot be turned into a request (e.g. its answer tokenizes to nothing)."""


class Encoder:
    """Text -> ids for one model: its tokenizer, its sequence-start token, optionally the chat template."""

    def __init__(self, tokenizer, start_id: int, eos_ids: tuple[int, ...] = (), chat_template=None):
        self.tokenizer = tokenizer
        self.start_id = start_id
        self.eos_ids = tuple(eos_ids)
        self.chat = chat_template

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with the start token, continuation ids) split as lm-evaluation-harness does."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.encode(context)
        whole = self.encode(context + continuation)
        return [self.start_id] + context_ids, whole[len(context_ids):]

    def chat_prompt(self, shots: list[Example], context: str, description: str = "") -> list[int]:
        messages = [{"role": "system", "content": description.strip()}] if description.strip() else []
        for shot in shots:
            messages.append({"role": "user", "content": shot.contexts[shot.gold].strip()})
            messages.append({"role": "assistant", "content": shot.continuations[shot.gold].strip()})
        messages.append({"role": "user", "content": context.strip()})
        return self.chat.render(messages, add_generation_prompt=True).ids


def fewshot_examples(task: Task, index: int, seed: int) -> list[Example]:
    """The demonstrations for example ``index`` of ``task`` (never the example itself)."""
    k = task.spec.num_fewshot
    if not k:
        return []
    rng = random.Random(f"{seed}/{task.name}/{index}")
    drawn = rng.sample(range(len(task.fewshot_pool)), k + 1 if task.fewshot_from_self else k)
    return [task.fewshot_pool[i] for i in drawn if not (task.fewshot_from_self and i == index)][:k]


def example_requests(task: Task, index: int, encoder: Encoder, seed: int, max_seq_len: int) -> list[Request]:
    """The requests whose results score example ``index`` of ``task``."""
    example = task.examples[index]
    if task.kind == "bits_per_byte":
        return rolling_windows(encoder.start_id, encoder.encode(example.continuations[0]), max_seq_len)
    shots = fewshot_examples(task, index, seed)
    if task.kind == "generate":
        return [_generation_request(task, example, shots, encoder, max_seq_len)]
    prefix = fewshot_prefix(task, example, shots)
    requests = []
    for choice, (context, continuation) in enumerate(zip(example.contexts, example.continuations)):
        if encoder.chat is not None:
            context_ids, continuation_ids = encoder.chat_prompt(shots, context, example.description), \
                encoder.chat.encode_text(continuation.strip())
        else:
            context_ids, continuation_ids = encoder.pair(prefix + context, continuation)
        if not continuation_ids:
            raise PromptError(f"task {task.name}, example {example.id}, choice {choice}: continuation "
                              f"{continuation!r} encodes to no tokens")
        requests.append(fit(LoglikelihoodRequest(tuple(context_ids), tuple(continuation_ids)), max_seq_len))
    return requests


def fewshot_prefix(task: Task, example: Example, shots: list[Example]) -> str:
    """What goes before the question: the task description, then each demonstration and its delimiter."""
    return example.description + "".join(shot.solved() + task.spec.fewshot_delimiter for shot in shots)


def fit(request: LoglikelihoodRequest, max_seq_len: int) -> LoglikelihoodRequest:
    """``request`` with context cut from the left to at most ``max_seq_len + 1`` tokens in all."""
    if len(request.continuation) > max_seq_len:
        raise PromptError(f"a continuation of {len(request.continuation)} tokens exceeds max_seq_len ({max_seq_len})")
    excess = request.length - (max_seq_len + 1)
    return request if excess <= 0 else LoglikelihoodRequest(request.context[excess:], request.continuation)


def _generation_request(task: Task, example: Example, shots: list[Example], encoder: Encoder,
                        max_seq_len: int) -> GenerationRequest:
    room = max_seq_len - task.spec.max_new_tokens
    if room < 1:
        raise PromptError(f"task {task.name}: max_new_tokens ({task.spec.max_new_tokens}) leaves no room "
                          f"for a prompt within max_seq_len ({max_seq_len})")
    stop_ids = encoder.eos_ids
    if encoder.chat is not None:
        prompt = encoder.chat_prompt(shots, example.contexts[0], example.description)
        stop_ids = tuple(dict.fromkeys(stop_ids + encoder.chat.stop_ids))
    else:
        prompt = [encoder.start_id] + encoder.encode(fewshot_prefix(task, example, shots) + example.contexts[0])
    return GenerationRequest(tuple(prompt[-room:]), task.spec.max_new_tokens, tuple(task.spec.stop), stop_ids)


def rolling_windows(start_id: int, ids: list[int], max_seq_len: int) -> list[LoglikelihoodRequest]:
    """Predict every token of ``ids`` once, in windows of at most ``max_seq_len`` tokens.

    Window ``[s, e)`` of the sequence ``start + ids`` is conditioned on the tokens before it that
    still fit: ``max_seq_len + 1 - (e - s)`` of them (at least one).
    """
    tokens = [start_id] + ids
    windows = []
    for start in range(1, len(tokens), max_seq_len):
        end = min(start + max_seq_len, len(tokens))
        context = tokens[max(0, end - max_seq_len - 1):start]
        windows.append(LoglikelihoodRequest(tuple(context), tuple(tokens[start:end])))
    return windows

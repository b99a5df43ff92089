"""The decoding engine behind ``llmray serve``: requests in, text deltas out, many requests per batch.

Why this shape:

* Continuous batching (:class:`Scheduler`): one :class:`llmray.model.generate.Decoder` per
  replica, one forward pass per step for every request in flight. A request that arrives while
  it runs is prefilled at the next step and decodes alongside the others; a finished one frees
  its row at once. Each request has its own cache row, positions, :class:`SamplingConfig`
  (budget, stop tokens, temperature/top-p/top-k, seed) and generator, so it gets the tokens it
  would get alone, and its budget is capped only by its own prompt and ``max_seq_len``.
* Model steps run in a worker thread: the replica's event loop keeps accepting requests (they
  join at the next step) and streaming text while the model computes.
* Prompts use the export's own formats: raw text opens with BOS and ends at EOS/BOS, as
  ``llmray generate``; chat is rendered by :class:`llmray.tokenizer.chat.ChatTemplate` and ends at
  ``<|end|>``/EOS, as ``llmray chat``. Special-token text in a prompt stays text.
* Stop strings are matched on the decoded text; while streaming, text that could still become a
  stop string is held back. A row whose text hit one, or whose client left, is finished in the
  decoder, so it stops costing compute at the next step.
* No Ray here: the engine runs and is tested in-process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import torch

from llmray.eval.worker import cut_at_stop
from llmray.model import hf
from llmray.model.generate import Decoder, Row, SamplingConfig, document_prompt, document_stop_tokens
from llmray.model.generate_cli import TextStream
from llmray.serve.openai_schema import GenerationParams, RequestError
from llmray.tokenizer.chat import ChatFormatError, ChatTemplate


@dataclass
class Job:
    """One request's decoding: prompt ids, sampling settings, stop strings."""

    prompt: list[int]
    sampling: SamplingConfig
    stop_strings: tuple[str, ...] = ()
    cancelled: bool = False  # the client left: the row is finished at the next step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True)
class Delta:
    """What one decoding step added to a request's answer."""

    text: str
    finish_reason: str | None  # on the last delta: "stop" (stop token or string) or "length"
    completion_tokens: int  # generated so far, a final stop token included
    batch_size: int  # requests in flight (stepped together) when this one was admitted, itself included


class Engine:
    """A loaded export (model, tokenizer, chat template) that turns requests into jobs and decodes them."""

    def __init__(self, pretrained: hf.Pretrained, tokenizer) -> None:
        self.model = pretrained.model
        self.max_seq_len = pretrained.config.max_seq_len
        self.vocab_size = pretrained.config.vocab_size
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer)
        self._special = pretrained.special_tokens

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "Engine":
        from tokenizers import Tokenizer

        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json: serve needs an llmray export "
                                    "(config.json, model.safetensors, tokenizer files)")
        return cls(hf.load(path, device=device, dtype=dtype), Tokenizer.from_file(str(path / "tokenizer.json")))

    def completion_job(self, prompt: str | list[int], params: GenerationParams) -> Job:
        """A raw-text continuation, as ``llmray generate`` makes it."""
        if isinstance(prompt, str):
            ids = self.template.encode_text(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= token < self.vocab_size for token in ids):
                raise RequestError(f"prompt token ids must lie in [0, {self.vocab_size})", param="prompt")
        return self._job(document_prompt(ids, self._special), document_stop_tokens(self._special), params)

    def chat_job(self, messages: list[dict], params: GenerationParams) -> Job:
        """The assistant's next turn, with the chat template ``llmray chat`` and SFT use."""
        try:
            ids = self.template.render(messages, add_generation_prompt=True).ids
        except ChatFormatError as exc:
            raise RequestError(str(exc), param="messages") from None
        return self._job(ids, list(self.template.stop_ids), params)

    def _job(self, prompt: list[int], stop_tokens: list[int], params: GenerationParams) -> Job:
        room = self.max_seq_len - len(prompt)
        wanted = params.max_tokens or 1
        if wanted > room:
            raise RequestError(f"this model's context is {self.max_seq_len} tokens: the prompt takes "
                               f"{len(prompt)}, so at most {max(room, 0)} can be generated, but {wanted} "
                               "were requested", param="max_tokens" if params.max_tokens else "prompt")
        sampling = SamplingConfig(max_new_tokens=params.max_tokens or room, temperature=params.temperature,
                                  top_k=params.top_k, top_p=params.top_p, stop_tokens=stop_tokens, seed=params.seed)
        return Job(prompt, sampling, params.stop)

class Scheduler:
    """Continuous batching: requests join the decoding at the next step, not after the current batch.

    One loop per replica steps every request in flight together, up to ``max_rows`` of them;
    requests beyond that wait for a free row. An idle loop waits ``wait_s`` for a burst to gather
    first, so it is prefilled in one pass. A failing step fails every request in flight with its
    error; the loop goes on for new ones with a fresh decoder.
    """

    def __init__(self, engine: Engine, max_rows: int, wait_s: float) -> None:
        self.engine, self.max_rows, self.wait_s = engine, max_rows, wait_s
        self._decoder = Decoder(engine.model, max_rows)
        self._pending: list[tuple[Job, asyncio.Queue]] = []
        self._running: dict[Row, tuple[_Progress, asyncio.Queue]] = {}
        self._loop: asyncio.Task | None = None

    async def submit(self, job: Job) -> AsyncIterator[Delta]:
        """The job's deltas up to the one that finishes it; leaving early cancels the job."""
        answers: asyncio.Queue = asyncio.Queue()
        self._pending.append((job, answers))
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._decode())
        finished = False
        try:
            while not finished:
                delta = await answers.get()
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:
                job.cancel()  # its row stops decoding at the next step

    def _admit(self) -> None:
        """Give free rows to waiting requests; drop the rows of requests whose client left."""
        for row, (progress, _) in list(self._running.items()):
            if progress.finished:
                self._decoder.finish(row)
                del self._running[row]
        admitted = []
        while self._pending and self._decoder.free_rows:
            job, queue = self._pending.pop(0)
            if job.cancelled:  # its client left while it waited
                continue
            try:
                admitted.append((self._decoder.add(job.prompt, job.sampling), job, queue))
            except ValueError as exc:  # the request gets the error; the loop serves others
                queue.put_nowait(exc)
        in_flight = len(self._running) + len(admitted)
        for row, job, queue in admitted:
            self._running[row] = (_Progress(job, self.engine.tokenizer, in_flight), queue)

    async def _decode(self) -> None:
        await asyncio.sleep(self.wait_s)  # let a burst of requests gather into the first prefill
        while self._pending or self._running:
            self._admit()
            try:
                stepped = await asyncio.to_thread(self._decoder.step)
            except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving
                for _, queue in self._running.values():
                    queue.put_nowait(exc)
                self._running = {}
                self._decoder = Decoder(self.engine.model, self.max_rows)
                continue
            for row, token in stepped:
                progress, queue = self._running[row]
                if progress.finished:  # its client left during the step
                    continue
                queue.put_nowait(progress.push(token))
                if progress.finished:
                    self._decoder.finish(row)
                    del self._running[row]


class _Progress:
    """One job's answer so far: tokens become text, cut at a stop string and held back while they may start one."""

    def __init__(self, job: Job, tokenizer, batch_size: int) -> None:
        self.job = job
        self._text = TextStream(tokenizer)
        self._stop_tokens = set(job.sampling.stop_tokens)
        self._complete = ""  # decoded text, complete characters only
        self._shown = 0
        self._tokens = 0
        self._finish_reason: str | None = None
        self._batch_size = batch_size

    @property
    def finished(self) -> bool:
        return self._finish_reason is not None or self.job.cancelled

    def push(self, token: int) -> Delta:
        self._tokens += 1
        if token in self._stop_tokens:
            return self.end("stop")
        self._complete += self._text.push(token)
        if self._cut_at_stop_string():
            return self._delta("stop")
        if self._tokens >= self.job.sampling.max_new_tokens:
            return self.end("length")
        return self._delta(None)

    def end(self, reason: str) -> Delta:
        self._complete += self._text.finish()
        return self._delta("stop" if self._cut_at_stop_string() else reason)

    def _cut_at_stop_string(self) -> bool:
        cut = cut_at_stop(self._complete, self.job.stop_strings)
        stopped, self._complete = len(cut) < len(self._complete), cut
        return stopped

    def _delta(self, finish_reason: str | None) -> Delta:
        self._finish_reason = finish_reason
        visible = self._complete
        if finish_reason is None:
            visible = visible[:len(visible) - _stop_prefix_length(visible, self.job.stop_strings)]
        text, self._shown = visible[self._shown:], max(self._shown, len(visible))
        return Delta(text, finish_reason, self._tokens, self._batch_size)


def _stop_prefix_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop string."""
    return max((k for stop in stop_strings for k in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:k])), default=0)

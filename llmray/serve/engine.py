"""The decoding engine behind ``llmray serve``: requests in, text deltas out, many requests per batch.

Why this shape:

* Continuous batching (:class:`Scheduler`): one decoding loop per replica; requests that arrive
  while it runs join at the next step as a new :class:`Batch`, so nobody waits for a whole batch
  to end. A batch's requests decode in lock step through :func:`llmray.model.generate.stream`
  with one :class:`SamplingConfig` per request (budget, stop tokens, temperature/top-p/top-k,
  seed), so each request gets the tokens it would get alone: prompts are left-padded with per-row
  positions, seeded rows draw from their own generators.
* A batch's KV cache holds ``longest prompt + largest budget`` slots and may not exceed
  ``max_seq_len``; requests that do not fit together are split into groups (first fit, longest
  prompt first) stepped in turn, so no request is ever cut short by its neighbours.
* Model steps run in a worker thread: the replica's event loop keeps accepting requests (they
  join at the next step) and streaming text while the model computes.
* Prompts use the export's own formats: raw text opens with BOS and ends at EOS/BOS, as
  ``llmray generate``; chat is rendered by :class:`llmray.tokenizer.chat.ChatTemplate` and ends at
  ``<|end|>``/EOS, as ``llmray chat``. Special-token text in a prompt stays text.
* Stop strings are matched on the decoded text; while streaming, text that could still become a
  stop string is held back. A row whose text hit one, or whose client left, is finished early
  by sending a mask into the stream, so it stops costing compute at the next step.
* No Ray here: the engine runs and is tested in-process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Generator, Sequence

import torch

from llmray.eval.worker import cut_at_stop
from llmray.model import hf
from llmray.model.generate import SamplingConfig, batch_fits, document_prompt, document_stop_tokens, stream
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


def plan_groups(prompt_lengths: Sequence[int], budgets: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Indices of requests to decode together, first fit with the longest prompt first, so that
    every group's KV cache fits (:func:`llmray.model.generate.batch_fits`)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(prompt_lengths)), key=lambda i: -prompt_lengths[i]):
        for group in groups:
            members = group + [index]
            if batch_fits([prompt_lengths[i] for i in members], [budgets[i] for i in members], max_seq_len):
                group.append(index)
                break
        else:
            groups.append([index])
    return [sorted(group) for group in groups]


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

class Batch:
    """Jobs admitted at one step: their cache groups and answers so far.

    :meth:`step` runs the model (in a worker thread), :meth:`deltas` turns its tokens into text
    (on the event loop). A group's rows stay allocated until every row of it has finished.
    """

    def __init__(self, engine: Engine, jobs: list[Job], batch_size: int) -> None:
        self.jobs = jobs
        self.progress = [_Progress(job, engine.tokenizer, batch_size) for job in jobs]
        plan = plan_groups([len(job.prompt) for job in jobs], [job.sampling.max_new_tokens for job in jobs],
                           engine.max_seq_len)
        self.groups = [_Group(rows, stream(engine.model, [jobs[i].prompt for i in rows],
                                           [jobs[i].sampling for i in rows])) for rows in plan]

    @property
    def finished(self) -> bool:
        return not self.groups

    def step(self) -> list[list[int] | None]:
        """One model step of every group: its rows' tokens, None for a group that ended."""
        stepped: list[list[int] | None] = []
        for group in self.groups:
            try:
                if group.started:
                    tokens = group.decoder.send(torch.tensor([self.progress[i].finished for i in group.rows]))
                else:
                    tokens, group.started = next(group.decoder), True
                stepped.append(tokens.tolist())
            except StopIteration:
                stepped.append(None)
        return stepped

    def deltas(self, stepped: list[list[int] | None]) -> list[Delta | None]:
        """Each job's :class:`Delta` of this step (``None`` for jobs finished before it); groups
        whose rows have all finished are closed."""
        deltas: list[Delta | None] = [None] * len(self.jobs)
        for group, tokens in zip(self.groups, stepped, strict=True):
            for row, index in enumerate(group.rows):
                if not self.progress[index].finished:
                    deltas[index] = self.progress[index].end("length") if tokens is None \
                        else self.progress[index].push(tokens[row])
        for group in [g for g in self.groups if all(self.progress[i].finished for i in g.rows)]:
            group.decoder.close()
            self.groups.remove(group)
        return deltas

    def close(self) -> None:
        for group in self.groups:
            group.decoder.close()
        self.groups = []


@dataclass
class _Group:
    rows: list[int]  # indices into the batch's jobs
    decoder: Generator[torch.Tensor, torch.Tensor | None, None]
    started: bool = False


class Scheduler:
    """Continuous batching: requests join the decoding at the next step, not after the current batch.

    One loop per replica steps every admitted batch together. Requests that arrive while it runs
    are admitted at the next step boundary as a new batch (their own cache groups), up to
    ``max_rows`` requests in flight; an idle loop waits ``wait_s`` for a burst to gather first.
    With batch-at-a-time decoding a request arriving mid-batch waited for the whole batch (up to
    ``max_tokens`` steps) and batches fragmented under a steady stream of requests.
    A failing step fails every request in flight with its error; the loop goes on for new ones.
    """

    def __init__(self, engine: Engine, max_rows: int, wait_s: float) -> None:
        self.engine, self.max_rows, self.wait_s = engine, max_rows, wait_s
        self._pending: list[tuple[Job, asyncio.Queue]] = []
        self._running: list[tuple[Batch, list[asyncio.Queue]]] = []
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

    def _rows_in_flight(self) -> int:
        return sum(len(batch.jobs) for batch, _ in self._running)

    def _admit(self) -> None:
        """Start a batch of the pending requests that fit in the free rows. (Holding them back
        until they fill the free rows, for fewer forward passes per step, measured slower:
        181 vs 215 tokens/s in ``bench/serve_load.py``.)"""
        in_flight = self._rows_in_flight()
        room = self.max_rows - in_flight
        admitted, self._pending = self._pending[:room], self._pending[room:]
        if not admitted:
            return
        queues = [queue for _, queue in admitted]
        try:
            batch = Batch(self.engine, [job for job, _ in admitted], in_flight + len(admitted))
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the loop serves others
            for queue in queues:
                queue.put_nowait(exc)
            return
        self._running.append((batch, queues))

    async def _decode(self) -> None:
        await asyncio.sleep(self.wait_s)  # let a burst of requests gather into the first batch
        while self._pending or self._running:
            self._admit()
            batches = [batch for batch, _ in self._running]
            try:
                stepped = await asyncio.to_thread(lambda: [batch.step() for batch in batches])
            except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving
                for batch, queues in self._running:
                    batch.close()
                    for queue in queues:
                        queue.put_nowait(exc)
                self._running = []
                continue
            for (batch, queues), tokens in zip(list(self._running), stepped, strict=True):
                for queue, delta in zip(queues, batch.deltas(tokens), strict=True):
                    if delta is not None:
                        queue.put_nowait(delta)
                if batch.finished:
                    self._running.remove((batch, queues))


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

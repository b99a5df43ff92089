"""Evaluate one checkpoint on a set of tasks: build requests, batch them, run them, score them.

Design choices:

* The driver builds every request of every task up front (token ids only) and cuts them into
  **deterministic batches**. Log-likelihood requests with the same context (the choices of a
  question, or any requests that happen to share one) are gathered into packed rows that a
  worker computes with the context once (:mod:`llmray.eval.worker`); rows are sorted by packed
  length, longest first, and cut into batches, so each batch is a **length bucket** of rows of
  nearly one length (little padding) and a too-long batch fails at once rather than at the end.
  Generation requests are grouped by their stopping rules. The batch list does not depend on how
  many workers there are, so an actor pool computes exactly the batches the in-process run
  computes, and the numbers agree (tested).
* ``num_actors: 0`` runs the :class:`~llmray.eval.worker.ModelWorker` in this process. Otherwise
  ``num_actors`` Ray actors each load the checkpoint once and a ``ray.util.ActorPool`` hands
  them batches as they free up (longest batches first, so the tail is short); results come back
  in batch order. Actors ask for ``num_cpus_per_actor`` (fractional, so a 2-CPU laptop can host
  two of them plus the driver's tasks) and ``num_gpus_per_actor`` (fractional GPUs share a card).
* Each actor sets its own torch thread count (``threads_per_actor``, default 1): on CPU, N
  single-threaded actors kept the cores busier than one N-threaded process for these small
  batches (``bench/eval_speed.py`` measures both).
* While batches run, a progress line (requests done / total, rate, ETA) is logged every
  ``progress_interval_s`` seconds (:mod:`llmray.progress`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmray import storage
from llmray.config import param
from llmray.eval import scoring
from llmray.eval.prompts import Encoder, GenerationRequest, Request, example_requests
from llmray.eval.tasks import Task
from llmray.eval.worker import ModelWorker
from llmray.model import hf
from llmray.model.shared_context import packed_length, shared_context_rows
from llmray.progress import Progress

log = logging.getLogger("llmray.eval")


@dataclass
class RunnerConfig:
    """Where and how requests are computed."""

    num_actors: int = param(2, doc="Ray actors, each holding the model; 0 = run in this process without Ray",
                            min=0)
    num_cpus_per_actor: float = param(0.5, doc="CPUs each actor reserves (fractional is fine)", min=0.0)
    num_gpus_per_actor: float = param(0.0, doc="GPUs each actor reserves (fractions share a GPU); > 0 runs "
                                               "the model on CUDA", min=0.0)
    threads_per_actor: int | None = param(1, doc="torch threads per actor (null = torch's default)", min=1)
    device: Literal["auto", "cpu", "cuda"] = param("auto", doc="auto = cuda for actors with a GPU share, and "
                                                              "in-process when a GPU is visible")
    precision: Literal["auto", "fp32", "bf16"] = param(
        "auto", doc="auto = bf16 on a CUDA device with bf16 support, else fp32 (bf16 scored 2.7x slower than "
                    "fp32 on a 2-core Xeon without AVX512-BF16/AMX); bf16 keeps norms, RoPE and log-softmax "
                    "in fp32")
    batch_size: int = param(256, doc="most requests per batch (raise on GPU)", min=1)
    max_batch_tokens: int = param(2048, doc="most padded tokens per batch (rows × longest row); on 2 CPU threads "
                                            "512-2048 scored ~1.15x faster than 16384 (cache-sized activations); "
                                            "raise on GPU", min=1)
    generation_batch_size: int = param(16, doc="most generation requests per batch (greedy decoding of a small "
                                               "model is bound by per-step overhead, which more rows amortize; "
                                               "each row holds a KV cache of prompt + max_new_tokens)", min=1)
    progress_interval_s: float = param(10.0, doc="seconds between progress lines while evaluating", min=0.0)


def make_batches(requests: list[Request], cfg: RunnerConfig, max_row_tokens: int) -> list[list[int]]:
    """Indices of ``requests`` grouped into batches; deterministic, longest first, one kind per batch.

    A log-likelihood batch holds whole packed rows (requests sharing a context, at most
    ``max_row_tokens`` tokens per row: the model's ``max_seq_len``), at most ``cfg.batch_size``
    requests unless one row alone has more, and at most ``cfg.max_batch_tokens`` padded tokens
    (rows × longest row). A generation batch holds at most ``cfg.generation_batch_size`` requests
    with the same stopping rules.
    """
    units: list[tuple[tuple, int, list[int]]] = []  # (kind key, length, request indices) per row
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, request in enumerate(requests):
        if isinstance(request, GenerationRequest):
            key = (0, request.max_new_tokens, request.stop_strings, request.stop_ids)
            units.append((key, request.length, [i]))
        else:
            by_context.setdefault(request.context, []).append(i)
    for indices in by_context.values():
        group = [requests[i] for i in indices]
        for row in shared_context_rows(group, max_row_tokens):
            length = packed_length(group[row[0]].context, [len(group[j].continuation) for j in row])
            units.append(((1,), length, [indices[j] for j in row]))
    units.sort(key=lambda unit: (unit[0], -unit[1], unit[2][0]))
    batches: list[list[int]] = []
    key, longest, rows = None, 0, 0

    def fits(indices: list[int]) -> bool:  # into the last batch, of kind ``key``
        size = len(batches[-1]) + len(indices)
        if key[0] == 0:
            return size <= cfg.generation_batch_size
        return size <= cfg.batch_size and (rows + 1) * longest <= cfg.max_batch_tokens

    for unit_key, length, indices in units:
        if batches and unit_key == key and fits(indices):
            batches[-1].extend(indices)
            rows += 1
        else:
            batches.append(list(indices))
            key, longest, rows = unit_key, length, 1
    return batches


class WorkerPool:
    """``num_actors`` Ray actors holding the model (or, with 0, one in-process worker)."""

    def __init__(self, worker_args: dict, cfg: RunnerConfig):
        self.local = ModelWorker(**worker_args) if cfg.num_actors == 0 else None
        self.actors = []
        if self.local is None:
            import ray

            actor_cls = ray.remote(ModelWorker).options(num_cpus=cfg.num_cpus_per_actor,
                                                        num_gpus=cfg.num_gpus_per_actor)
            self.actors = [actor_cls.remote(**worker_args) for _ in range(cfg.num_actors)]

    def map(self, batches: list[list[Request]], progress: Progress | None = None) -> list[list]:
        """Results of every batch, in batch order; ``progress`` counts the requests answered."""
        if self.local is not None:
            results = (self.local.run(batch) for batch in batches)
        else:
            from ray.util import ActorPool

            results = ActorPool(self.actors).map(lambda actor, batch: actor.run.remote(batch), batches)
        done = []
        for result in results:
            done.append(result)
            if progress is not None:
                progress.advance(len(result))
        return done

    def close(self) -> None:
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
            self.actors = []


@dataclass
class ModelInfo:
    """What request building needs to know about a checkpoint, read without loading its weights."""

    max_seq_len: int
    start_id: int
    eos_ids: tuple[int, ...]
    tokenizer_file: str  # a local path or a URI


def model_info(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> ModelInfo:
    config_path = storage.join(model_dir, hf.CONFIG_FILE)
    if not storage.is_file(config_path):
        raise FileNotFoundError(f"{model_dir} has no {hf.CONFIG_FILE}: not a model directory")
    raw = json.loads(storage.read_text(config_path))
    model_cfg = hf.config_from_hf(raw, config_path)
    tokenizer_dir = tokenizer_dir or model_dir
    tokenizer_file = storage.join(tokenizer_dir, "tokenizer.json")
    if not storage.is_file(tokenizer_file):
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir} (set `tokenizer` to its directory)")
    from_model = hf.special_tokens_from(raw)
    from_tokenizer = hf.special_tokens_from_tokenizer(tokenizer_dir)
    bos = from_model.bos_token_id if from_model.bos_token_id is not None else from_tokenizer.bos_token_id
    eos = tuple(from_model.eos_token_ids or from_tokenizer.eos_token_ids)
    if bos is None and not eos:
        raise ValueError(f"{model_dir}: neither the model nor the tokenizer names a BOS or EOS token to "
                         f"start sequences with")
    return ModelInfo(model_cfg.max_seq_len, bos if bos is not None else eos[0], eos, tokenizer_file)


@dataclass
class RequestPlan:
    """Every request of a set of tasks for one model, and which requests score which example."""

    requests: list[Request]
    spans: dict[str, list[tuple[int, int]]]  # task -> per example: [start, end) into requests
    info: ModelInfo


def plan_requests(model_dir: str | Path, tasks: list[Task], *, chat: bool = False, seed: int = 1234,
                  tokenizer_dir: str | Path | None = None) -> RequestPlan:
    from tokenizers import Tokenizer

    from llmray.tokenizer.chat import ChatTemplate

    info = model_info(model_dir, tokenizer_dir)
    tokenizer = Tokenizer.from_str(storage.read_text(info.tokenizer_file))
    encoder = Encoder(tokenizer, info.start_id, info.eos_ids, ChatTemplate(tokenizer) if chat else None)
    requests: list[Request] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    for task in tasks:
        spans[task.name] = []
        for index in range(len(task.examples)):
            start = len(requests)
            requests.extend(example_requests(task, index, encoder, seed, info.max_seq_len))
            spans[task.name].append((start, len(requests)))
    return RequestPlan(requests, spans, info)


def worker_args(model_dir: str | Path, info: ModelInfo, cfg: RunnerConfig) -> dict:
    """Constructor arguments of the :class:`ModelWorker`.

    Threads are set only inside actors (never in the caller's process). An actor uses CUDA only
    when it reserved a GPU share, so actors never use a GPU Ray did not give them.
    """
    device = cfg.device
    if cfg.num_actors and device == "auto":
        device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
    return dict(model_dir=str(model_dir), tokenizer_file=str(info.tokenizer_file), device=device,
                precision=cfg.precision, threads=cfg.threads_per_actor if cfg.num_actors else None)


def evaluate_model(model_dir: str | Path, tasks: list[Task], cfg: RunnerConfig, *, chat: bool = False,
                   seed: int = 1234, tokenizer_dir: str | Path | None = None, bootstrap_iters: int = 1000,
                   label: str | None = None) -> dict[str, dict]:
    """``{task: {"metrics": {name: {"value", "stderr"}}, "scores": [per-example dicts]}}``.

    ``label`` names the checkpoint in the progress line (default: ``model_dir``). The actors are
    started first, so they load the model while the requests are built.
    """
    pool = WorkerPool(worker_args(model_dir, model_info(model_dir, tokenizer_dir), cfg), cfg)
    try:
        plan = plan_requests(model_dir, tasks, chat=chat, seed=seed, tokenizer_dir=tokenizer_dir)
        batches = make_batches(plan.requests, cfg, plan.info.max_seq_len)
        log.info("%s: %d requests in %d batches over %d tasks", model_dir, len(plan.requests), len(batches),
                 len(tasks))
        progress = Progress(f"eval {label or model_dir}", len(plan.requests), "requests", logger=log,
                            interval=cfg.progress_interval_s)
        batch_results = pool.map([[plan.requests[i] for i in batch] for batch in batches], progress)
        progress.finish()
    finally:
        pool.close()
    results: list = [None] * len(plan.requests)
    for batch, batch_result in zip(batches, batch_results):
        for i, result in zip(batch, batch_result):
            results[i] = result
    evaluated = {}
    for task in tasks:
        scores = [scoring.score_example(task, example, results[start:end])
                  for example, (start, end) in zip(task.examples, plan.spans[task.name])]
        evaluated[task.name] = {"metrics": scoring.aggregate(task, scores, bootstrap_iters, seed), "scores": scores}
    return evaluated

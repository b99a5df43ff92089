"""Evaluate one checkpoint on a set of tasks: build requests, batch them, run them, score them.

Design choices:

* The driver builds every request of every task up front (token ids only) and cuts them into
  **deterministic batches**: log-likelihood requests sorted longest first (least padding, and a
  too-long batch fails at once rather than at the end), generation requests grouped by their
  stopping rules. The batch list does not depend on how many workers there are, so an actor
  pool computes exactly the batches the in-process run computes, and the numbers agree (tested).
* ``num_actors: 0`` runs the :class:`~llmray.eval.worker.ModelWorker` in this process. Otherwise
  ``num_actors`` Ray actors each load the checkpoint once and a ``ray.util.ActorPool`` hands
  them batches as they free up (longest batches first, so the tail is short); results come back
  in batch order. Actors ask for ``num_cpus_per_actor`` (fractional, so a 2-CPU laptop can host
  two of them plus the driver's tasks) and ``num_gpus_per_actor`` (fractional GPUs share a card).
* Each actor sets its own torch thread count (``threads_per_actor``, default 1): on CPU, N
  single-threaded actors kept the cores busier than one N-threaded process for these small
  batches (``bench/eval_speed.py`` measures both).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmray.config import param
from llmray.eval import scoring
from llmray.eval.prompts import Encoder, GenerationRequest, Request, example_requests
from llmray.eval.tasks import Task
from llmray.eval.worker import ModelWorker
from llmray.model import hf

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
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", doc="model weights dtype "
                                                             "(float16 is unusably slow on CPU)")
    batch_size: int = param(16, doc="most requests per batch (small batches balance the actor pool: on 2 "
                                    "CPU cores 2 actors ran 1.84x one actor at 16, 1.62x at 32; raise on GPU)",
                            min=1)
    max_batch_tokens: int = param(16384, doc="most padded tokens per batch (rows × longest row)", min=1)


def make_batches(requests: list[Request], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices of ``requests`` grouped into batches; deterministic, longest first, one kind per batch."""
    def group_key(i: int) -> tuple:
        r = requests[i]
        if isinstance(r, GenerationRequest):
            return (0, r.max_new_tokens, r.stop_strings, r.stop_ids)
        return (1,)

    order = sorted(range(len(requests)), key=lambda i: (group_key(i), -requests[i].length, i))
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current and group_key(current[0]) == group_key(i) and len(current) < batch_size \
                and (len(current) + 1) * requests[current[0]].length <= max_batch_tokens:
            current.append(i)
        else:
            batches.append([i])
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

    def map(self, batches: list[list[Request]]) -> list[list]:
        """Results of every batch, in batch order."""
        if self.local is not None:
            return [_logged(i, len(batches), self.local.run(batch)) for i, batch in enumerate(batches)]
        from ray.util import ActorPool

        results = ActorPool(self.actors).map(lambda actor, batch: actor.run.remote(batch), batches)
        return [_logged(i, len(batches), result) for i, result in enumerate(results)]

    def close(self) -> None:
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
            self.actors = []


def run_batches(batches: list[list[Request]], worker_args: dict, cfg: RunnerConfig) -> list[list]:
    """Results of every batch, in batch order, in-process or on an actor pool made for them."""
    pool = WorkerPool(worker_args, cfg)
    try:
        return pool.map(batches)
    finally:
        pool.close()


def _logged(index: int, total: int, result: list) -> list:
    if (index + 1) % 50 == 0 or index + 1 == total:
        log.info("batches done: %d/%d", index + 1, total)
    return result


@dataclass
class ModelInfo:
    """What request building needs to know about a checkpoint, read without loading its weights."""

    max_seq_len: int
    start_id: int
    eos_ids: tuple[int, ...]
    tokenizer_file: Path


def model_info(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> ModelInfo:
    model_dir = Path(model_dir)
    config_path = model_dir / hf.CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {hf.CONFIG_FILE}: not a model directory")
    raw = json.loads(config_path.read_text())
    model_cfg = hf.config_from_hf(raw, str(config_path))
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else model_dir
    tokenizer_file = tokenizer_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
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
    tokenizer = Tokenizer.from_file(str(info.tokenizer_file))
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
                dtype=cfg.dtype, threads=cfg.threads_per_actor if cfg.num_actors else None)


def evaluate_model(model_dir: str | Path, tasks: list[Task], cfg: RunnerConfig, *, chat: bool = False,
                   seed: int = 1234, tokenizer_dir: str | Path | None = None,
                   bootstrap_iters: int = 1000) -> dict[str, dict]:
    """``{task: {"metrics": {name: {"value", "stderr"}}, "scores": [per-example dicts]}}``."""
    plan = plan_requests(model_dir, tasks, chat=chat, seed=seed, tokenizer_dir=tokenizer_dir)
    batches = make_batches(plan.requests, cfg.batch_size, cfg.max_batch_tokens)
    log.info("%s: %d requests in %d batches over %d tasks", model_dir, len(plan.requests), len(batches), len(tasks))
    batch_results = run_batches([[plan.requests[i] for i in batch] for batch in batches],
                                worker_args(model_dir, plan.info, cfg), cfg)
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

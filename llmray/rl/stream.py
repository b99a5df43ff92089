"""The learner's data: rollout batches from a pool of Ray actors, turned into GRPO micro-batches.

Ray shape (single controller, as verl / OpenRLHF): rank 0 of the learner drives ``actors``
rollout actors (:class:`~llmray.rl.rollout.RolloutWorker`); every rank reads the same stream
object, so the trainer needs nothing RL-specific (:class:`RolloutStream` is its ``data``).

* **Weight sync.** At each step the stream publishes the learner's weights when the trainer's
  step (the *policy version*) moved: gathered in full (a collective on every rank), then put once
  in the object store by rank 0 and fetched by an actor only when a request names a newer
  publication, or (``rollout.weight_sync: broadcast``, the default for GPU actors) broadcast by
  rank 0 to every actor through a process group of their own (:mod:`llmray.rl.weight_sync`).
  Version 0 is the initial weights, which the actors load from the model directory themselves.
* **Staleness.** With ``max_staleness`` k, k rollout batches are kept in flight: after taking the
  batch for step s, rank 0 submits batches for steps s+1 .. s+k with the weights of version s,
  so generation overlaps training and no sample is more than k versions old (checked on every
  batch; 0 = on-policy: each batch is generated after the previous update). Every sample keeps
  the version that produced it.
* **Faults.** A rollout actor that dies is replaced by a new one and its chunk is resubmitted
  (same seeds, so the same samples), up to ``max_replacements`` times per chunk.
* **Batches.** Rollout batch b samples ``prompts_per_step`` problems (an epoch-wise seeded
  permutation) × ``group_size`` completions, each with a seed derived from (seed, b, problem
  slot, sample); advantages are normalised within each group on rank 0, then every
  data-parallel shard takes its share of the sequences as micro-batches.
* **Resume.** The state is the number of batches drawn and the in-flight batches' samples (they
  are collected at checkpoint time), so a resumed run trains on exactly the same samples.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from llmray.config import param
from llmray.rl.grpo import GrpoConfig, grpo_batch, group_advantages
from llmray.rl.rewards import RewardConfig
from llmray.rl.rollout import RolloutWorker, SamplingSpec, WorkItem, from_wire
from llmray.rl.tasks import Problem

log = logging.getLogger("llmray.rl")


class RewardFunctionFailed(RuntimeError):
    """The reward function failed on every sample of a rollout batch: a broken function, not data."""


class RolloutFailed(RuntimeError):
    """A rollout chunk kept failing after its actor was replaced ``max_replacements`` times."""


@dataclass
class RolloutPoolConfig:
    """The rollout actors."""

    actors: int = param(2, doc="Ray actors generating completions, each holding a policy copy", min=1)
    actor_cpus: float = param(0.5, doc="logical CPUs each actor reserves (fractions allowed)", min=0.01)
    actor_gpus: float = param(0.0, doc="GPUs each actor reserves (0 = generate on CPU)", min=0.0)
    threads: int = param(1, doc="torch threads per actor", min=1)
    max_replacements: int = param(3, doc="times a chunk is resubmitted to a fresh actor after its actor died",
                                  min=0)
    weight_sync: Literal["auto", "object_store", "broadcast"] = param(
        "auto", doc="how each policy version reaches the actors: object_store (put once by the learner, fetched "
                    "by each actor), broadcast (a process group of the learner's rank 0 and the actors: NCCL "
                    "between GPUs, gloo on CPU; llmray.rl.weight_sync); auto = broadcast when actors have GPUs")

    def broadcasts(self) -> bool:
        return self.weight_sync == "broadcast" or (self.weight_sync == "auto" and self.actor_gpus > 0)


@dataclass
class RolloutSpec:
    """Everything a learner rank needs to build its :class:`RolloutStream` (a picklable DataRecipe)."""

    problems: list[Problem]
    prompts: list[tuple[int, ...]]  # the problems rendered as chat prompts
    model_dir: str
    tokenizer_dir: str
    sampling: SamplingSpec
    reward: RewardConfig
    grpo: GrpoConfig
    pool: RolloutPoolConfig
    prompts_per_step: int
    group_size: int
    micro_batch_size: int
    max_staleness: int
    seed: int
    learner_row_tokens: int
    pad_id: int = 0

    def __call__(self, shard: int, shards: int) -> "RolloutStream":
        return RolloutStream(self, shard, shards)

    def work_items(self, batch: int) -> list[WorkItem]:
        """The (problem, sample, seed) items of rollout batch ``batch``, grouped by problem."""
        n, per_step = len(self.problems), self.prompts_per_step
        items = []
        for slot in range(per_step):
            position = batch * per_step + slot
            epoch_order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, position // n)))
            problem = int(epoch_order[position % n])
            for sample in range(self.group_size):
                items.append(WorkItem(problem, sample, derive_seed(self.seed, batch, slot, sample),
                                      self.prompts[problem], self.problems[problem]))
        return items


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and machines)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Pending:
    """One rollout batch: submitted chunks, or (once collected or restored) its samples."""

    index: int  # rollout batch number
    version: int  # policy version it was submitted with
    chunks: list[tuple[int, list[WorkItem], Any]] = field(default_factory=list)  # (actor slot, items, future)
    key: tuple[int, int] = (0, 0)  # (version, publication) of the weights
    weights: list | None = None
    samples: list[dict] | None = None


class RolloutPool:
    """Rollout actors; a dead actor is replaced and its chunk resubmitted.

    Weights reach the actors through the object store (:meth:`publish` returns the reference that
    requests carry) or, with ``weight_sync`` broadcast, through a process group that the pool forms
    with its actors (:mod:`llmray.rl.weight_sync`). A replaced actor breaks that group: the pool
    forms a new one and broadcasts the latest weights again, and the dead actor's chunk is
    resubmitted with them (samples then carry that newer version, still within ``max_staleness``).
    """

    def __init__(self, spec: RolloutSpec):
        import ray

        self.spec = spec
        cfg = spec.pool
        self.actor_class = ray.remote(num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus)(RolloutWorker)
        self.actors = [self._new_actor() for _ in range(cfg.actors)]
        self.replaced = 0
        self.group = None  # the broadcast group, formed at the first broadcast and after a replacement
        self.generation = 0
        self.latest: tuple[tuple[int, int], dict, torch.device] | None = None  # broadcast weights: key, state, device

    def _new_actor(self):
        s = self.spec
        return self.actor_class.options(scheduling_strategy="DEFAULT").remote(
            s.model_dir, s.tokenizer_dir, s.sampling, s.reward, s.grpo.kl_coef > 0, s.pool.threads)

    def publish(self, key: tuple[int, int], state: dict[str, torch.Tensor], device: torch.device) -> list | None:
        """Make the weights ``key`` the actors' next: ``[ObjectRef]`` for requests to carry, or None once
        broadcast (``state``: the learner's full weights, sent from ``device``)."""
        import ray

        if not self.spec.pool.broadcasts():
            return [ray.put(state)]
        self.latest = (key, state, device)
        self._broadcast()
        return None

    def _broadcast(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        from llmray.rl import weight_sync

        key, state, device = self.latest
        for attempt in range(self.spec.pool.max_replacements + 1):
            if self.group is None:
                self._form_group(device)
            receiving = [actor.receive_weights.remote(key) for actor in self.actors]
            try:
                weight_sync.send(self.group, state, device)
                ray.get(receiving)
                return
            except (RayActorError, RuntimeError) as exc:  # a member died: gloo/NCCL raise, Ray names the actor
                if attempt == self.spec.pool.max_replacements or not self._replace_dead():
                    raise RolloutFailed(f"broadcasting the weights {key} to the rollout actors failed: {exc}") from exc

    def _form_group(self, device: torch.device) -> None:
        import ray

        from llmray.rl import weight_sync

        self.generation += 1
        world = len(self.actors) + 1
        store = weight_sync.host_store(world)
        address = weight_sync.GroupAddress(store.host, store.port, world,
                                           "nccl" if device.type == "cuda" else "gloo", self.generation)
        joining = [actor.join_weight_group.remote(address, rank) for rank, actor in enumerate(self.actors, 1)]
        self.group = weight_sync.join(address, 0, store)
        ray.get(joining)

    def _replace_dead(self) -> bool:
        """Replace every actor that no longer answers; whether any was."""
        import ray
        from ray.exceptions import RayActorError

        replaced = False
        for slot, actor in enumerate(self.actors):
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=60)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                log.warning("rollout actor %d died; replacing it", slot)
                self._replace(slot)
                replaced = True
        return replaced

    def _replace(self, slot: int) -> None:
        """A new actor in ``slot``; the broadcast group, which held the old one, is formed anew when next used."""
        self.actors[slot] = self._new_actor()
        self.replaced += 1
        self.group = None

    def submit(self, pending: Pending, items: list[WorkItem]) -> Pending:
        count = len(self.actors)
        bounds = [len(items) * i // count for i in range(count + 1)]
        for slot in range(count):
            chunk = items[bounds[slot]:bounds[slot + 1]]
            if chunk:
                pending.chunks.append((slot, chunk, self._call(slot, pending, chunk)))
        return pending

    def _call(self, slot: int, pending: Pending, chunk: list[WorkItem]):
        return self.actors[slot].rollout.remote(pending.key, pending.weights, chunk)

    def collect(self, pending: Pending) -> list[dict]:
        """The batch's samples in item order, replacing actors that died on the way."""
        import ray
        from ray.exceptions import RayActorError

        if pending.samples is not None:
            return pending.samples
        samples = []
        for slot, chunk, future in pending.chunks:
            for attempt in range(self.spec.pool.max_replacements + 1):
                try:
                    samples += from_wire(ray.get(future))
                    break
                except RayActorError as exc:
                    if attempt == self.spec.pool.max_replacements:
                        raise RolloutFailed(f"rollout batch {pending.index}: chunk of {len(chunk)} items failed "
                                            f"{attempt + 1} times; last error: {exc}") from exc
                    log.warning("rollout actor %d died (%s); replacing it and resubmitting %d items",
                                slot, type(exc).__name__, len(chunk))
                    self._replace(slot)
                    if self.latest is not None:  # broadcast weights: a new group, the latest weights again
                        self._broadcast()
                        pending.key = self.latest[0]
                    future = self._call(slot, pending, chunk)
        pending.samples, pending.chunks = samples, []
        return samples

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.group = None


class RolloutStream:
    """Micro-batches of GRPO training rows; ``attach`` (by :class:`RolloutStats`) gives it the trainer."""

    def __init__(self, spec: RolloutSpec, shard: int, shards: int):
        self.spec, self.shard, self.shards = spec, shard, shards
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.trainer = None
        self.pool: RolloutPool | None = None
        self.drawn = 0  # rollout batches trained on (or being trained on)
        self.pending: deque[Pending] = deque()
        self.micro: deque[dict] = deque()
        self.published = 0  # policy version of the latest published weights (0: model_dir's)
        self.key = (0, 0)  # rank 0: (version, publication) of the weights in the object store
        self.publications = 0
        self.weights: list | None = None
        self.last_stats: dict = {}

    def attach(self, trainer) -> None:
        """Take the trainer; rank 0 starts the rollout actors now, so their start-up (a process, imports,
        the policy's weights: about 2 s on CPU) overlaps the learner's own before its first step."""
        self.trainer = trainer
        if self.rank == 0 and self.pool is None:
            self.pool = RolloutPool(self.spec)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.micro:
            self.micro.extend(self._step_batches())
        return self.micro.popleft()

    # -- one step's rollouts -------------------------------------------------------------------

    def _step_batches(self) -> list[dict]:
        if self.trainer is None:
            raise RuntimeError("RolloutStream is not attached to a trainer (add RolloutStats to the job's hooks)")
        version = self.trainer.step
        self._publish(version)
        rows = self._rank0_rows(version) if self.rank == 0 else None
        if self.world > 1:
            box = [rows]
            dist.broadcast_object_list(box, src=0)
            rows = box[0]
        self.drawn += 1
        mine = rows[self.shard::self.shards]
        size = self.spec.micro_batch_size
        batches = [self._micro_batch(mine[i:i + size]) for i in range(0, len(mine), size)]
        if len(batches) != self.trainer.cfg.grad_accum:
            raise ValueError(f"a rollout batch gives {len(batches)} micro-batches per data-parallel rank, but "
                             f"train.grad_accum is {self.trainer.cfg.grad_accum}")
        return batches

    def _publish(self, version: int) -> None:
        """Put the learner's weights of ``version`` in the object store (rank 0), once per version."""
        if version == self.published:
            return
        self.published = version
        state = self.trainer.export_weights()  # full weights on CPU; a collective under FSDP2
        if self.rank == 0:
            self.publications += 1
            self.key = (version, self.publications)
            self.weights = self.pool.publish(self.key, state, self.trainer.device)

    def _rank0_rows(self, version: int) -> list[dict]:
        if self.pending and self.pending[0].version > version:  # a rollback: from weights now discarded
            self.pending.clear()
        if not self.pending:
            self.pending.append(self._submit(self.drawn, version))
        started = time.perf_counter()
        batch = self.pending.popleft()
        samples = self.pool.collect(batch)
        waited = time.perf_counter() - started
        oldest = min(s["version"] for s in samples)
        if version - oldest > self.spec.max_staleness or max(s["version"] for s in samples) > version:
            raise RuntimeError(f"rollout batch {batch.index} holds samples of policy versions {oldest}.."
                               f"{max(s['version'] for s in samples)} at version {version} "
                               f"(max_staleness {self.spec.max_staleness})")
        while len(self.pending) < self.spec.max_staleness:
            self.pending.append(self._submit(self.drawn + 1 + len(self.pending), version))
        return self._training_rows(batch.index, samples, version, waited)

    def _submit(self, index: int, version: int) -> Pending:
        pending = Pending(index, version, key=self.key, weights=self.weights if version else None)
        return self.pool.submit(pending, self.spec.work_items(index))

    def _training_rows(self, index: int, samples: list[dict], version: int, waited: float) -> list[dict]:
        failed = [s for s in samples if s["error"] is not None]
        if len(failed) == len(samples):
            raise RewardFunctionFailed(f"the reward function failed on all {len(samples)} samples of rollout "
                                       f"batch {index}; the first failure:\n{failed[0]['error']}")
        if failed:
            log.warning("reward function failed on %d of %d samples (scored 0); the first:\n%s",
                        len(failed), len(samples), failed[0]["error"])
        rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float32)
        advantages = group_advantages(rewards, self.spec.group_size, self.spec.grpo.scale_rewards == "group")
        self.last_stats = {
            "rollout_batch": index, "policy_version": version,
            "oldest_sample_version": min(s["version"] for s in samples),
            "reward_mean": float(rewards.mean()), "correct_mean": sum(s["correct"] for s in samples) / len(samples),
            "finished_rate": sum(s["finished"] for s in samples) / len(samples),
            "completion_tokens_mean": sum(len(s["completion"]) for s in samples) / len(samples),
            "reward_failures": float(len(failed)), "rollout_wait_s": waited,
            "actors_replaced": float(self.pool.replaced)}
        return [{"prompt": s["prompt"], "completion": s["completion"], "old_logps": s["old_logps"],
                 "ref_logps": s["ref_logps"], "advantage": float(a), "version": s["version"]}
                for s, a in zip(samples, advantages.tolist())]

    def _micro_batch(self, rows: list[dict]) -> dict:
        return grpo_batch([r["prompt"].tolist() for r in rows], [r["completion"].tolist() for r in rows],
                          [r["old_logps"] for r in rows],
                          [r["ref_logps"] for r in rows] if self.spec.grpo.kl_coef else None,
                          [r["advantage"] for r in rows], self.spec.learner_row_tokens, self.spec.pad_id)

    # -- checkpoint state and shutdown ---------------------------------------------------------

    def state_dict(self) -> dict:
        """Batches drawn and the in-flight batches' samples (collected now, so a resume trains on them)."""
        in_flight = [{"index": p.index, "version": p.version, "samples": self.pool.collect(p)}
                     for p in self.pending] if self.pool is not None else []
        return {"drawn": self.drawn, "in_flight": in_flight}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])
        self.pending = deque(Pending(p["index"], p["version"], samples=p["samples"]) for p in state["in_flight"])
        self.micro.clear()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class RolloutStats:
    """Hook: attaches the trainer to its :class:`RolloutStream` and keeps each step's rollout figures
    (the reward curve of the report); rank 0 writes them to metrics.jsonl."""

    def __init__(self, trainer):
        self.trainer, self.stream = trainer, trainer.data
        self.stream.attach(trainer)
        self.history: list[dict] = []

    def __call__(self, step: int, metrics: dict) -> None:
        if not step or not self.stream.last_stats:
            return
        record = {"step": step, "loss": metrics.get("loss"), **self.stream.last_stats}
        self.history.append(record)
        if self.trainer.rank == 0 and self.trainer.writer is not None:
            self.trainer.writer.write(step, {k: v for k, v in record.items() if k != "step"}, console=False)

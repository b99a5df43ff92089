"""Rollouts: completions sampled by a copy of the policy, their log-probs and rewards.

Design choices:

* :class:`RolloutWorker` holds a policy copy (and, with a KL penalty, the frozen reference) and
  turns :class:`WorkItem` s into samples; it runs as a Ray actor (:mod:`llmray.rl.stream`) or in
  process, the same code either way.
* Each completion is drawn by the KV-cache :class:`~llmray.model.generate.Decoder` with its *own*
  seeded generator (the item's seed, derived from the run seed, the rollout batch, the problem
  and the sample), so a sample depends only on its seed and the policy version: the same on any
  actor, in any chunk, after a resume or an actor replacement.
* The behaviour log-probs (``old_logps``) are read off the logits that sampled each token (fp32
  log-softmax, untempered, as the learner computes its own): the same weights and positions as a
  teacher-forced pass, equal to it within float rounding (tested to 1e-5), at no extra cost. A
  second forward pass over the completions took 40% of a worker's time (0.19 of 0.47 s for 128
  rows). The reference log-probs (with a KL penalty) still need one pass of the reference model,
  in rows that hold each prompt once, as the learner's (:func:`~llmray.rl.grpo.pack_sequences`).
* A sample is a plain dict of tensors and numbers, so in-flight rollouts can be stored in a
  trainer checkpoint (read back with ``weights_only=True``).
* The worker's weights start as the initial policy (version 0); a newer version is fetched from
  the object store only when a request names it, or received by broadcast beforehand
  (:mod:`llmray.rl.weight_sync`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from llmray.config import param
from llmray.rl.rewards import RewardConfig, Rewarder
from llmray.rl.tasks import Problem


@dataclass
class SamplingSpec:
    """How rollouts sample."""

    max_new_tokens: int = param(32, doc="most tokens per completion", min=1)
    temperature: float = param(1.0, doc="sampling temperature (> 0: GRPO needs varied completions)", min=0.01)
    top_p: float = param(1.0, doc="nucleus sampling mass", min=0.01, max=1.0)


@dataclass(frozen=True)
class WorkItem:
    problem: int  # index of the problem in the stage's training list
    sample: int  # 0 .. group_size-1
    seed: int  # of this completion's sampling generator
    prompt: tuple[int, ...]  # the rendered chat prompt, ending with the assistant header
    task: Problem


@torch.no_grad()
def completion_logps(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """fp32 log-probability of every completion token under ``model``: one (len(completion),) each, from
    one forward over rows that hold each prompt once (as the learner's, :func:`~llmray.rl.grpo.grpo_batch`)."""
    from llmray.model.shared_context import continuation_logps
    from llmray.rl.grpo import pack_sequences

    packed = pack_sequences(prompts, completions, model.cfg.max_seq_len)
    device = next(model.parameters()).device
    logps = continuation_logps(model, packed.to(device)).cpu()
    return list(logps.split([len(c) for c in completions]))


@torch.no_grad()
def sequence_rewards(reward_model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]]) -> list[float]:
    """A reward model's score of each prompt + completion (at its last token), in one forward pass."""
    from llmray.rl.reward_model import sequence_scores

    sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
    tokens = torch.zeros((len(sequences), max(map(len, sequences))), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = torch.tensor(sequence)
    last = torch.tensor([len(s) - 1 for s in sequences])
    device = next(reward_model.parameters()).device
    return sequence_scores(reward_model, tokens.to(device), last.to(device)).cpu().tolist()


@torch.no_grad()
def sample_completions(model: torch.nn.Module, items: Sequence[WorkItem], sampling: SamplingSpec,
                       stop_ids: Sequence[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """One completion per item (ending with its stop token when it finished), each from its own seed,
    and the fp32 log-probability of each of its tokens under ``model``."""
    from llmray.model.generate import Decoder, SamplingConfig

    decoder = Decoder(model, len(items), max(len(item.prompt) for item in items) + sampling.max_new_tokens,
                      keep_logps=True)
    rows = [decoder.add(list(item.prompt),
                        SamplingConfig(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                       top_p=sampling.top_p, stop_tokens=list(stop_ids), seed=item.seed))
            for item in items]
    tokens: dict[Any, list[int]] = {row: [] for row in rows}
    while stepped := decoder.step():
        for row, token in stepped:
            tokens[row].append(token)
    return [tokens[row] for row in rows], [torch.tensor(row.logps, dtype=torch.float32) for row in rows]


def to_wire(samples: list[dict]) -> list[dict]:
    """Samples with their tensors as numpy arrays, for the trip from a rollout actor to the learner.

    Why: pickling a torch tensor costs tens of microseconds each way (measured: 128 samples of 4
    small tensors took 41 ms to pickle and 123 ms to unpickle, against 1.3 and 0.7 ms as numpy
    arrays), a fixed cost per rollout batch that does not shrink with more actors.
    """
    return [{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in sample.items()} for sample in samples]


def from_wire(samples: list[dict]) -> list[dict]:
    """The samples of :func:`to_wire` with their tensors back (copies: the arrays may be read-only views)."""
    return [{k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in sample.items()} for sample in samples]


class RolloutWorker:
    """A policy copy that samples, scores and rewards completions (the body of a rollout actor)."""

    def __init__(self, model_dir: str, tokenizer_dir: str, sampling: SamplingSpec, reward: RewardConfig,
                 reference: bool, threads: int | None = None):
        from llmray.model import hf
        from llmray.tokenizer import load_tokenizer
        from llmray.tokenizer.chat import ChatTemplate

        if threads:
            torch.set_num_threads(threads)
        # a GPU actor (rollout.actor_gpus > 0) sees the GPU Ray assigned it as cuda:0
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.policy = hf.load(model_dir, self.device).model
        self.reference = hf.load(model_dir, self.device).model if reference else None
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.stop_ids = ChatTemplate(self.tokenizer).stop_ids
        self.sampling = sampling
        self.rewarder = Rewarder(reward)
        self.reward_model = hf.load(reward.model, self.device).model if reward.kind == "reward_model" else None
        if self.reward_model is not None and self.reward_model.cfg.head != "score":
            raise ValueError(f"{reward.model} is a language model (head=lm), not a reward model: train one with "
                             "`llmray reward train`")
        self.key = (0, 0)  # (policy version, publication) of the weights held: model_dir's

    @property
    def version(self) -> int:
        return self.key[0]

    def rollout(self, key: tuple[int, int], weights: list | None, items: Sequence[WorkItem]) -> list[dict]:
        """Samples of ``items`` by the weights ``key`` = (policy version, publication); ``weights`` is
        ``[ObjectRef]`` of their state dict (in a list, so Ray passes the reference and the weights
        are fetched only when the key changes; publications tell apart the weights of one version
        number before and after a rollback)."""
        if key != self.key:
            if weights is None:
                raise RuntimeError(f"rollout with weights {tuple(key)}, but this actor holds {self.key} and they were "
                                   "not broadcast to it (llmray.rl.weight_sync)")
            import ray

            self.policy.load_state_dict(ray.get(weights[0]))
            self.key = tuple(key)
        return to_wire(self.samples(items))

    def join_weight_group(self, address, rank: int) -> None:
        """Become ``rank`` of the learner's weight broadcast group (:mod:`llmray.rl.weight_sync`)."""
        from llmray.rl import weight_sync

        self.weight_group = weight_sync.join(address, rank)

    def receive_weights(self, key: tuple[int, int]) -> None:
        """Receive the learner's weights ``key`` from the broadcast group into the policy."""
        from llmray.rl import weight_sync

        weight_sync.receive(self.weight_group, self.policy)
        self.key = tuple(key)

    def greedy(self, items: Sequence[WorkItem]) -> list[dict]:
        """Samples of ``items`` decoded greedily (the held-out exact-match check)."""
        return self.samples(items, dataclasses.replace(self.sampling, temperature=0.0))

    def samples(self, items: Sequence[WorkItem], sampling: SamplingSpec | None = None) -> list[dict]:
        completions, old = sample_completions(self.policy, items, sampling or self.sampling, self.stop_ids)
        prompts = [item.prompt for item in items]
        ref = completion_logps(self.reference, prompts, completions) if self.reference is not None \
            else [torch.zeros(0)] * len(items)
        model_scores = sequence_rewards(self.reward_model, prompts, completions) if self.reward_model is not None \
            else [None] * len(items)
        out = []
        for item, completion, old_logps, ref_logps, model_score in zip(items, completions, old, ref, model_scores):
            finished = completion[-1] in self.stop_ids
            text = self.tokenizer.decode(completion[:-1] if finished else completion)
            scored = self.rewarder(text, item.task, finished) if model_score is None \
                else self.rewarder.from_value(model_score, finished)
            out.append({"problem": item.problem, "sample": item.sample, "seed": item.seed, "version": self.version,
                        "prompt": torch.tensor(item.prompt), "completion": torch.tensor(completion),
                        "old_logps": old_logps, "ref_logps": ref_logps, "finished": finished,
                        "reward": scored.reward, "correct": scored.correct, "error": scored.error, "text": text})
        return out

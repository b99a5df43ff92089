"""The reward model: the Llama model with a scalar head, trained with the Bradley-Terry loss.

InstructGPT's recipe (Ouyang et al. 2022, eq. 1): the SFT model's vocabulary head is replaced by
a head giving one scalar per position; the reward of a conversation is that scalar at its last
token (the reply's closing end-of-turn), and for a pair the loss is

    L = −log σ(r(x, y_chosen) − r(x, y_rejected))

so the model learns which reply people preferred (only the difference of rewards is defined).

* The model is ``ModelConfig(head="score")``: the same :class:`~llmray.model.llama.Transformer`,
  exported as Hugging Face ``LlamaForSequenceClassification`` with ``num_labels: 1`` (the
  layout TRL's reward models use; ``score.weight``), loadable by :func:`llmray.model.hf.load`.
* It is initialised from an LM export (:class:`ScalarHeadInit`): every weight but the head is
  the LM's, the head is drawn from normal(0, init_std) with the run seed.
* Pairs are the DPO pairs (:func:`llmray.align.pairs.encode_pairs`: HH-RLHF, OASST ranks, user
  JSONL), read through :class:`RewardPairs` as (chosen rows, rejected rows, last-token index).
* The training objective is :class:`BradleyTerry` on the one training core; the held-out
  metrics (pair accuracy: share of pairs with r(chosen) > r(rejected), with its 95% Wilson
  interval; mean margin; loss) come from :func:`reward_pair_metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmray import storage
from llmray.align.pairs import PairRows
from llmray.model import param_init
from llmray.model.config import ModelConfig
from llmray.train.objectives import LossOutput, Objective

METRIC_NAMES = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_chosen − r_rejected), from rewards (N,) each."""
    return -F.logsigmoid(chosen - rejected)


def sequence_scores(model: nn.Module, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The score-head value at position ``last`` of each row: tokens (N, T), last (N,) → (N,) fp32."""
    scores = model(tokens)[..., 0].float()  # (N, T)
    return scores.gather(1, last[:, None]).squeeze(1)


@dataclass
class RewardPairs:
    """Preference pairs as reward-model rows (a :class:`~llmray.align.loader.RowSource`)."""

    rows: PairRows

    def __len__(self) -> int:
        return len(self.rows)

    @functools.cached_property
    def fingerprint(self) -> str:
        return self.rows.fingerprint

    @property
    def tokens(self) -> np.ndarray:
        return self.rows.tokens

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``tokens`` (2n, W): the n chosen then the n rejected sequences, cut to the longest; ``last``
        (2n,) the index of each one's final token; ``valid`` (n,) 0 for loader padding (row -1)."""
        rows = np.asarray(rows, dtype=np.int64)
        valid = rows >= 0
        pairs = np.where(valid, rows, 0)
        indices = np.concatenate([pairs, pairs + len(self.rows)])
        lengths = self.rows.lengths[indices]
        return {"tokens": self.rows.tokens[indices, :int(lengths.max())], "last": lengths - 1,
                "valid": valid.astype(np.int64)}


class BradleyTerry(Objective):
    """The reward model's loss on :class:`RewardPairs` batches; weight = real pairs."""

    def weight(self, batch: dict) -> int:
        return int(batch["valid"].sum())

    def tokens(self, batch: dict) -> int:
        return batch["tokens"].numel()

    def pair_terms(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per pair (n,): loss and both rewards; 0 where not ``valid``."""
        chosen, rejected = sequence_scores(model, batch["tokens"], batch["last"]).chunk(2)
        valid = batch["valid"].to(chosen.dtype)
        return {"loss": bradley_terry_loss(chosen, rejected) * valid, "chosen": chosen.detach() * valid,
                "rejected": rejected.detach() * valid}

    def loss(self, model: nn.Module, batch: dict) -> LossOutput:
        return LossOutput(self.pair_terms(model, batch)["loss"].sum(), self.weight(batch))


def reward_pair_metrics(objective: BradleyTerry, model: nn.Module, rows: RewardPairs, batch_size: int, rank: int,
                        world_size: int) -> dict:
    """Mean loss, pair accuracy, margin and rewards over every pair of ``rows`` (all ranks), and ``pairs``."""
    from llmray.align.dpo import pair_sums

    def terms(batch: dict, valid: torch.Tensor) -> list[torch.Tensor]:
        t = objective.pair_terms(model, batch)
        return [t["loss"].sum(), ((t["chosen"] > t["rejected"]) & valid).sum(), (t["chosen"] - t["rejected"]).sum(),
                t["chosen"].sum(), t["rejected"].sum()]

    sums, pairs = pair_sums(model, rows, batch_size, rank, world_size, terms)
    return {**{name: value / pairs for name, value in zip(METRIC_NAMES, sums)}, "pairs": pairs}


@dataclass
class ScalarHeadInit:
    """A model source (:mod:`llmray.train.launch`): the LM export at ``directory`` with its vocabulary
    head replaced by a scalar head."""

    directory: str

    @property
    def config(self) -> ModelConfig:
        from llmray.model import hf

        return dataclasses.replace(hf.read_config(self.directory), head="score", tie_embeddings=False)

    def build(self, seed: int) -> tuple[nn.Module, ModelConfig, param_init.Source]:
        """On ``meta``: the body from the LM's weights file, the scalar head N(0, init_std) from ``seed``."""
        from llmray.model import hf, llama

        cfg = self.config
        body = hf.WeightSlices(storage.local_copy(self.directory), cfg, skip=("output.weight",))
        head = param_init.seeded(seed, lambda name: param_init.Rule("normal", cfg.init_std))

        def values(name: str, *where) -> torch.Tensor:
            return (head if name == "output.weight" else body)(name, *where)
        return llama.build(cfg, "meta"), cfg, values

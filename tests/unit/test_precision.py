"""``train.precision``: the ``auto`` rule, and bf16 compute with fp32 master state in one process.

For the single process and FSDP2 with dp = 1 (which used to train in fp32 whatever the setting),
for pretraining, SFT (packed, masked) and DPO: with ``precision: bf16`` the first Linear computes
in bf16 (its output dtype: under autocast its fp32 input is cast inside the op), parameters and
AdamW state stay fp32, and after 50 steps the loss is within 2% of the fp32 run's. The fp32 run
is recorded the same way, so a hook that could not see bf16 would fail. TP-only and PP-only are
in ``tests/dist/test_precision_layouts.py``.
"""

from __future__ import annotations

import pytest
import torch

from llmray.parallel import ParallelConfig
from llmray.tokens.loader import TokenLoader
from llmray.train import precision
from llmray.train.objectives import DPO, IGNORE_INDEX, CausalLM, MaskedLM, sequence_logps
from llmray.train.schedule import ScheduleConfig
from llmray.train.trainer import OptimizerConfig, TrainConfig, Trainer
from tests.train_support import SEQ_LEN, stdlib_texts, tiny_model, write_byte_shards

STEPS = 50
LOSS_RTOL = 0.02


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_byte_shards(tmp_path_factory.mktemp("shards"), stdlib_texts(6))


def test_the_auto_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.compute_dtype("fp32", cpu, 384) is None
    assert precision.compute_dtype("bf16", cpu, 64) is torch.bfloat16

    def no_probe(width, hidden):
        raise AssertionError("narrow models must not be probed")
    monkeypatch.setattr(precision, "cpu_bf16_speedup", no_probe)
    assert precision.compute_dtype("auto", cpu, 64, 192) is None
    for speedup, expected in [(2.0, torch.bfloat16), (1.1, None)]:
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda width, hidden, s=speedup: s)
        assert precision.compute_dtype("auto", cpu, 384, 1024) is expected
    with pytest.raises(ValueError, match="'fp16'"):
        precision.compute_dtype("fp16", cpu, 384)


def test_the_probe_times_both_dtypes_at_the_model_shape():
    precision.cpu_bf16_speedup.cache_clear()
    speedup = precision.cpu_bf16_speedup(256, 512)
    assert 0.05 < speedup < 50
    assert precision.cpu_bf16_speedup.cache_info().misses == 1


class Batches:
    """TokenLoader rows turned into another objective's batches (``state_dict`` passed through)."""

    def __init__(self, loader: TokenLoader, to_batch):
        self.loader, self.to_batch = loader, to_batch

    def __iter__(self):
        return self

    def __next__(self):
        return self.to_batch(next(self.loader))

    def state_dict(self) -> dict:
        return self.loader.state_dict()


def pretrain_batch(rows: torch.Tensor) -> torch.Tensor:
    return rows


def sft_batch(rows: torch.Tensor) -> dict:
    """Three packed 'conversations' per row; the first quarter of each (the 'prompt') is not a target."""
    inputs, targets = rows[:, :-1], rows[:, 1:].clone()
    length = inputs.shape[1]
    segment_ids = (torch.arange(length) * 3 // length).expand_as(inputs)
    targets[:, (torch.arange(length) % (length // 3)) < length // 12] = IGNORE_INDEX
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids}


REFERENCE = tiny_model(0)


def dpo_batch(rows: torch.Tensor) -> dict:
    """Chosen rows are real text; rejected ones the same rows reversed after the shared first half."""
    half = rows.shape[1] // 2
    rejected = torch.cat([rows[:, :half], rows[:, half:].flip(1)], dim=1)
    both = torch.cat([rows, rejected])
    inputs, targets = both[:, :-1], both[:, 1:].clone()
    targets[:, :half - 1] = IGNORE_INDEX
    with torch.no_grad():
        reference = sequence_logps(REFERENCE, inputs, targets)
    return {"inputs": inputs, "targets": targets, "reference_logps": reference,
            "valid": torch.ones(rows.shape[0], dtype=torch.int64)}


OBJECTIVES = {"pretrain": (CausalLM, pretrain_batch, 3e-3), "sft": (MaskedLM, sft_batch, 3e-3),
              "dpo": (lambda: DPO(beta=0.1), dpo_batch, 3e-4)}


def trainer(shards, objective: str, precision_: str, strategy: str) -> Trainer:
    make_objective, to_batch, lr = OBJECTIVES[objective]
    cfg = TrainConfig(steps=STEPS, precision=precision_, optimizer=OptimizerConfig(lr=lr),
                      schedule=ScheduleConfig(warmup_steps=2), log_every=10, peak_flops=1e11)
    data = Batches(TokenLoader(shards, seq_len=SEQ_LEN, batch_size=4, seed=0), to_batch)
    return Trainer(cfg, tiny_model(0), make_objective(), data, parallel=ParallelConfig(strategy=strategy))


def record_first_linear(model: torch.nn.Module) -> list[torch.dtype]:
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    first.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    return seen


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("strategy", ["none", "fsdp2"])
def test_bf16_computes_in_bf16_keeps_fp32_master_state_and_tracks_the_fp32_loss(shards, objective, strategy):
    runs = {}
    for name in ("fp32", "bf16"):
        run = trainer(shards, objective, name, strategy)
        seen = record_first_linear(run.engine.model)
        runs[name] = (run, run.fit(), set(seen))
    (_, fp32_result, fp32_seen), (bf16, bf16_result, bf16_seen) = runs["fp32"], runs["bf16"]
    assert fp32_seen == {torch.float32} and bf16_seen == {torch.bfloat16}
    assert {p.dtype for p in bf16.engine.model.parameters()} == {torch.float32}
    state = [t for s in bf16.engine.optimizer.state.values() for t in s.values() if t.is_floating_point()]
    assert state and {t.dtype for t in state} == {torch.float32}
    final32, final16 = fp32_result.losses[STEPS], bf16_result.losses[STEPS]
    assert final32 < fp32_result.losses[1]  # it trained
    assert abs(final16 - final32) / final32 < LOSS_RTOL, (final16, final32)

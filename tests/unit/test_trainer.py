"""The training core in one process: learning, accumulation, exact resume, checkpoint integrity, guards."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from llmray import storage
from llmray.train.checkpoint import LocalCheckpointStore, ObjectStoreCheckpointStore, is_complete, step_dir_name
from llmray.train.guards import GuardConfig, TrainingDiverged
from llmray.train.metrics import MetricsWriter
from llmray.train.objectives import CausalLM
from llmray.train.trainer import OptimizerConfig, parameter_groups
from tests.train_support import Faulty, make_trainer, stdlib_texts, tiny_model, write_byte_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_byte_shards(tmp_path_factory.mktemp("shards"), stdlib_texts(12))


def snapshot(trainer):
    return [p.detach().clone() for p in trainer.engine.model.parameters()]


def test_loss_falls_and_metrics_are_written(shards, tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tmp_path / "tb", console_every=10)
    result = make_trainer(shards, steps=30, writer=writer).fit()
    writer.close()
    losses = result.losses
    assert losses[1] > math.log(257) - 0.5  # starts near uniform over the vocabulary
    assert sum(losses[i] for i in range(26, 31)) / 5 < losses[1] - 1.0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "memory_mb"):
        assert key in lines[-1], key
    assert 0 < lines[-1]["val_bpb"] < 8 and lines[-1]["val_loss"] > 0
    assert any((tmp_path / "tb").iterdir())


def test_a_peak_measured_under_load_is_measured_again_instead_of_reporting_mfu_above_one(shards):
    seen = []
    trainer = make_trainer(shards, steps=2, hooks=[lambda step, metrics: seen.append(metrics["mfu"])])
    trainer.cfg.peak_flops = None  # measured, not configured ...
    trainer.peak_flops = 1.0  # ... while something else held the cores: 1 FLOP/s
    trainer.fit()
    assert trainer.peak_flops > 1e8 and all(0 < mfu <= 1 for mfu in seen), (trainer.peak_flops, seen)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA B200", 2.25e15), ("Tesla T4", None)])
def test_mfu_is_taken_against_the_datasheet_bf16_peak_of_known_gpus(monkeypatch, name, peak):
    from llmray.train import metrics

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.datasheet_peak_flops(torch.device("cuda", 0), torch.bfloat16) == peak
    assert metrics.datasheet_peak_flops(torch.device("cuda", 0), torch.float32) is None
    assert metrics.datasheet_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    if peak is not None:
        assert metrics.peak_flops(torch.device("cuda", 0), torch.bfloat16) == peak
        assert metrics.peak_flops(torch.device("cuda", 0), torch.bfloat16, configured=1e12) == 1e12


def test_weight_decay_groups_exclude_norms_and_embeddings():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, OptimizerConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or "tok_embeddings" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_equals_one_big_batch(shards):
    big = make_trainer(shards, steps=6, batch=4).fit().losses
    accumulated = make_trainer(shards, steps=6, batch=2, accum=2).fit().losses
    for step in big:
        assert accumulated[step] == pytest.approx(big[step], rel=1e-5)


class Stop(Exception):
    pass


def stop_at(step_to_stop):
    def hook(step, metrics):
        if step == step_to_stop:
            raise Stop
    return hook


def test_exact_resume_is_bitwise_and_incomplete_checkpoints_are_ignored(shards, tmp_path):
    straight = make_trainer(shards, steps=20).fit().losses

    store = LocalCheckpointStore(tmp_path / "ckpt", num_to_keep=2)
    with pytest.raises(Stop):
        make_trainer(shards, steps=20, store=store, checkpoint_every=10, hooks=[stop_at(10)]).fit()
    assert store.latest().name == step_dir_name(10)
    # A fresh process-like start: different init seed, fresh loader; everything comes from the checkpoint.
    resumed = make_trainer(shards, steps=20, store=store, checkpoint_every=10, init_seed=123)
    result = resumed.fit()
    assert result.resumed_from.endswith(step_dir_name(10))
    assert sorted(result.losses) == list(range(11, 21))
    for step in range(11, 21):
        assert result.losses[step] == straight[step], step  # bitwise

    # Checkpoint integrity: interrupt the write of step 20 in two ways; step 10 is used instead.
    latest = tmp_path / "ckpt" / step_dir_name(20)
    assert is_complete(latest)[0]
    shard = next(latest.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    ok, why = is_complete(latest)
    assert not ok and "truncated" in why
    shard.write_bytes(data)
    (latest / ".metadata").unlink()
    assert not is_complete(latest)[0]
    assert store.latest().name == step_dir_name(10)
    again = make_trainer(shards, steps=12, store=store).fit()
    assert again.resumed_from.endswith(step_dir_name(10)) and sorted(again.losses) == [11, 12]
    assert again.losses[11] == straight[11]


def test_muon_learns_and_resumes_bitwise_from_its_checkpoint(shards, tmp_path):
    """Muon's momentum buffers and AdamW's moments go through the DCP checkpoint; a guard skip
    leaves both untouched, as with AdamW."""
    muon = OptimizerConfig(kind="muon", lr=3e-3)
    straight = make_trainer(shards, steps=12, optimizer=muon).fit().losses
    assert sum(straight[i] for i in (10, 11, 12)) / 3 < straight[1] - 1.0
    store = LocalCheckpointStore(tmp_path / "ckpt")
    with pytest.raises(Stop):
        make_trainer(shards, steps=12, store=store, checkpoint_every=6, hooks=[stop_at(6)], optimizer=muon).fit()
    resumed = make_trainer(shards, steps=12, store=store, init_seed=123, optimizer=muon).fit()
    assert [resumed.losses[s] for s in range(7, 13)] == [straight[s] for s in range(7, 13)]  # bitwise

    seen = {}

    def record(step, metrics):
        seen[step] = snapshot(trainer), copy.deepcopy(trainer.engine.optimizer.state_dict()["state"])
    trainer = make_trainer(shards, steps=5, objective=Faulty({4}, math.nan), optimizer=muon, hooks=[record])
    assert [r.verdict for r in trainer.fit().records].index("skip_nonfinite") == 3
    (weights_3, state_3), (weights_4, state_4) = seen[3], seen[4]
    assert all(torch.equal(a, b) for a, b in zip(weights_3, weights_4))  # step 4 changed nothing
    assert state_3.keys() == state_4.keys() and all(
        torch.equal(state_3[k][name], value) for k, s in state_4.items() for name, value in s.items())
    assert any("momentum_buffer" in s for s in state_4.values())


def test_num_to_keep_prunes_old_checkpoints(shards, tmp_path):
    store = LocalCheckpointStore(tmp_path / "ckpt", num_to_keep=2)
    make_trainer(shards, steps=8, store=store, checkpoint_every=2).fit()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [step_dir_name(6), step_dir_name(8)]


def test_checkpoints_on_an_object_store_resume_bitwise_and_an_interrupted_upload_is_never_used(
        shards, s3_bucket, monkeypatch):
    straight = make_trainer(shards, steps=8).fit().losses
    root = storage.join(s3_bucket, "ckpt")
    store = ObjectStoreCheckpointStore(root, num_to_keep=2)
    with pytest.raises(Stop):
        make_trainer(shards, steps=8, store=store, checkpoint_every=2, hooks=[stop_at(6)]).fit()
    assert storage.list_dirs(root) == [step_dir_name(4), step_dir_name(6)]

    upload_folder = storage.upload_folder

    def dropped_before_the_metadata(folder, location, last=()):
        upload_folder(folder, location, last=last)
        storage.delete(storage.join(location, ".metadata"))  # the connection died before the last file
        raise ConnectionError("upload interrupted")

    monkeypatch.setattr(storage, "upload_folder", dropped_before_the_metadata)
    with pytest.raises(ConnectionError):
        make_trainer(shards, steps=8, store=store, checkpoint_every=8).fit()
    monkeypatch.setattr(storage, "upload_folder", upload_folder)
    assert step_dir_name(8) in storage.list_dirs(root) and store.latest().name == step_dir_name(6)
    resumed = make_trainer(shards, steps=8, store=store, init_seed=123).fit()
    assert resumed.resumed_from.endswith(step_dir_name(6))
    assert [resumed.losses[s] for s in (7, 8)] == [straight[7], straight[8]]  # bitwise
    assert is_complete(store.latest())[0] and store.latest().name == step_dir_name(8)

def test_resume_from_explicit_checkpoint_refuses_an_incomplete_one(shards, tmp_path):
    store = LocalCheckpointStore(tmp_path / "a")
    make_trainer(shards, steps=4, store=store, checkpoint_every=4).fit()
    source = tmp_path / "a" / step_dir_name(4)
    result = make_trainer(shards, steps=6).fit(resume_from=source)
    assert sorted(result.losses) == [5, 6]
    (source / "trainer_rank0.pt").unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint: trainer_rank0.pt is missing"):
        make_trainer(shards, steps=6).fit(resume_from=source)


def test_injected_nan_leaves_weights_bit_unchanged_and_training_continues(shards):
    weights = {}
    trainer = make_trainer(shards, steps=8, objective=Faulty({4}, math.nan),
                           hooks=[lambda step, m: weights.__setitem__(step, snapshot(trainer))])
    result = trainer.fit()
    assert result.guard_counts["nonfinite_skips"] == 1
    assert [r.verdict for r in result.records].count("skip_nonfinite") == 1
    assert all(torch.equal(a, b) for a, b in zip(weights[3], weights[4]))  # step 4 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(weights[4], weights[5]))  # step 5 trained
    assert result.steps == 8 and math.isfinite(result.losses[8])


def test_persistent_nan_aborts_with_a_clear_error(shards):
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        make_trainer(shards, steps=10, objective=Faulty({2, 3, 4, 5}, math.nan),
                     guards=GuardConfig(max_consecutive_nonfinite=3)).fit()


def test_loss_spike_is_skipped(shards):
    weights = {}
    trainer = make_trainer(shards, steps=9, objective=Faulty({8}, 20.0),
                           guards=GuardConfig(min_history=5, spike_ratio=3.0),
                           hooks=[lambda step, m: weights.__setitem__(step, snapshot(trainer))])
    result = trainer.fit()
    assert result.guard_counts["spike_skips"] == 1 and result.records[7].verdict == "skip_spike"
    assert all(torch.equal(a, b) for a, b in zip(weights[7], weights[8]))


def test_repeated_spikes_roll_back_to_the_checkpoint_and_skip_the_batches(shards, tmp_path):
    store = LocalCheckpointStore(tmp_path / "ckpt")
    guards = GuardConfig(min_history=4, spike_ratio=3.0, rollback_after=2)
    trainer = make_trainer(shards, steps=10, store=store, checkpoint_every=6, objective=Faulty({8, 9}, 20.0),
                           guards=guards)
    result = trainer.fit()
    assert [r.verdict for r in result.records][6:9] == ["step", "skip_spike", "rollback"]
    assert [r.step for r in result.records][9:] == [7, 8, 9, 10]  # back to step 6, then on to the end
    assert result.guard_counts["rollbacks"] == 1 and result.steps == 10
    # 13 batches were drawn for 10 steps: the data moved on past the spiking batches.
    assert trainer.data.order.consumed == 13 * 4


def test_initial_values_are_refused_for_a_model_that_is_already_materialized():
    from llmray.model import param_init
    from llmray.train.trainer import TrainConfig, Trainer

    model = tiny_model(0)
    with pytest.raises(ValueError, match="already materialized"):
        Trainer(TrainConfig(steps=1), model, CausalLM(), iter(()), init=param_init.seeded(0, model.init_rule))


def test_the_gemm_peak_is_timed_once_per_process_and_again_only_when_asked(monkeypatch):
    from llmray.train import metrics

    timings = iter([5e9, 9e9, 7e9])
    calls = []
    monkeypatch.setattr(metrics, "_measured_peaks", {})
    monkeypatch.setattr(metrics, "measure_peak_flops",
                        lambda device, dtype, seconds: calls.append((device, dtype)) or next(timings))
    cpu = torch.device("cpu")
    assert metrics.peak_flops(cpu, torch.float32) == metrics.peak_flops(cpu, torch.float32) == 5e9
    assert metrics.measured_peak_flops(cpu, torch.float32, again=True) == 9e9  # a higher timing replaces it
    assert metrics.measured_peak_flops(cpu, torch.float32, again=True) == 9e9  # a lower one does not
    assert metrics.peak_flops(cpu, torch.float32) == 9e9 and len(calls) == 3

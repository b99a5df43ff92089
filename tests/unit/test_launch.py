"""The one training launch path: execution rules, the shared config shape, and an in-process run that
starts from another run's checkpoint with its own peak learning rate (what a PBT exploit hands over)."""

from __future__ import annotations

import json

import pytest

from llmray import config as config_lib
from llmray.align.dpo import DpoConfig
from llmray.align.sft import SftConfig
from llmray.config import ConfigError
from llmray.model.config import preset
from llmray.train.launch import BatchConfig, ExecutionConfig, launch
from llmray.train.pretrain import PretrainConfig, ProxyConfig, TokensInput, pretrain_job
from llmray.train.schedule import ScheduleConfig
from llmray.train.trainer import OptimizerConfig, TrainConfig
from tests.train_support import stdlib_texts, write_byte_shards


def test_auto_launcher_trains_in_process_only_for_one_worker_without_a_gpu():
    assert ExecutionConfig().in_process
    assert not ExecutionConfig(workers=2).in_process
    assert not ExecutionConfig(use_gpu=True).in_process
    assert not ExecutionConfig(launcher="ray_train").in_process
    assert ExecutionConfig(launcher="process", use_gpu=True).in_process
    with pytest.raises(ValueError, match="launcher=process trains in this one process, but workers=2"):
        ExecutionConfig(launcher="process", workers=2)
    assert ProxyConfig().execution.in_process and ProxyConfig().execution.threads_per_worker == 1
    assert not PretrainConfig().execution.in_process  # pretraining restarts failed workers by default


def test_batch_seed_defaults_to_the_train_seed():
    assert BatchConfig().order_seed(TrainConfig(seed=7)) == 7
    assert BatchConfig(seed=3).order_seed(TrainConfig(seed=7)) == 3


@pytest.mark.parametrize("cls, raw, message", [
    (PretrainConfig, {"ray": {"num_workers": 2}}, "unknown config key 'ray'"),
    (PretrainConfig, {"data": {"seq_len": 64}}, "unknown config key 'data.seq_len'"),
    (ProxyConfig, {"init_from": "x"}, "unknown config key 'init_from'"),
    (ProxyConfig, {"tokens": "x"}, "unknown config key 'tokens'"),
    (SftConfig, {"sources": [{"path": "x"}], "batch_size": 4}, "unknown config key 'batch_size'"),
    (DpoConfig, {"sources": [{"path": "x"}], "workers": 2}, "unknown config key 'workers'"),
])
def test_old_key_names_fail_with_the_unknown_key_error(cls, raw, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_dict(cls, raw)


def test_the_proxy_sizes_its_vocabulary_from_the_token_shards_and_pretraining_checks_it(tmp_path):
    shards = write_byte_shards(tmp_path / "shards", stdlib_texts(6))  # 257 token ids
    proxy = ProxyConfig(model=preset("tiny", vocab_size=100), data=TokensInput(str(shards)))
    assert pretrain_job(proxy, tmp_path / "c", None).model.config.vocab_size == 257
    small = PretrainConfig(model=preset("tiny", vocab_size=100), data=TokensInput(str(shards)))
    with pytest.raises(ValueError, match=r"model.vocab_size \(100\) is smaller than the tokenizer's vocabulary \(257\)"):
        pretrain_job(small, tmp_path / "c", None)


def test_resume_from_another_run_keeps_its_state_but_takes_this_configs_peak_lr(tmp_path):
    shards = write_byte_shards(tmp_path / "shards", stdlib_texts(6))

    def run(name: str, steps: int, lr: float, resume_from=None):
        cfg = PretrainConfig(model=preset("tiny", vocab_size=257, max_seq_len=64), data=TokensInput(str(shards)),
                             batch=BatchConfig(seq_len=32, micro_batch_size=4),
                             train=TrainConfig(steps=steps, log_every=1, peak_flops=1e11,
                                               optimizer=OptimizerConfig(lr=lr),
                                               schedule=ScheduleConfig(kind="constant", warmup_steps=0)),
                             execution=ExecutionConfig(launcher="process", threads_per_worker=1),
                             resume_from=resume_from)
        metrics = tmp_path / f"{name}.jsonl"
        result = launch(pretrain_job(cfg, tmp_path / name, metrics, export_dir=tmp_path / name / "model"),
                        connect_ray=lambda: pytest.fail("an in-process launch must not start Ray"))
        return result, [json.loads(line) for line in metrics.read_text().splitlines()]

    first, first_metrics = run("first", 4, lr=1e-3)
    assert first.checkpoint.endswith("/step_00000004") and [m["lr"] for m in first_metrics] == [1e-3] * 4
    assert (tmp_path / "first" / "model" / "model.safetensors").is_file()
    second, second_metrics = run("second", 6, lr=5e-3, resume_from=str(first.checkpoint))
    assert [m["step"] for m in second_metrics] == [5, 6]  # step, optimizer and data position came along
    assert [m["lr"] for m in second_metrics] == [5e-3, 5e-3]  # the peak lr is this config's
    assert second.worker["steps"] == 6 and second.checkpoint.endswith("/step_00000006")



def test_a_token_budget_sets_the_steps_from_the_model_and_batch(tmp_path):
    shards = write_byte_shards(tmp_path / "shards", stdlib_texts(6))
    raw = {"model": {"vocab_size": 257, "depth": 2, "max_seq_len": 64}, "data": {"tokens": str(shards)},
           "batch": {"seq_len": 32, "micro_batch_size": 4}, "execution": {"workers": 2},
           "train": {"tokens_per_param": 0.5, "grad_accum": 3}}
    cfg = config_lib.from_dict(PretrainConfig, raw)
    parameters = cfg.model.num_params()
    assert parameters == 2 * cfg.model.params_per_layer() + 257 * 128 * 2 + 128  # depth 2: dim 128, untied
    assert cfg.tokens_per_step() == 4 * 32 * 3 * 2
    assert pretrain_job(cfg, tmp_path / "c", None).train.steps == -(-parameters // 2 // (4 * 32 * 3 * 2))
    assert pretrain_job(config_lib.from_dict(PretrainConfig, {**raw, "train": {"steps": 7}}),
                        tmp_path / "c", None).train.steps == 7


def test_a_partly_given_section_keeps_its_stage_s_defaults():
    """configs/train/cpu-small.yaml names execution.workers only: pretraining must stay on Ray Train."""
    pretrain = config_lib.from_dict(PretrainConfig, {"execution": {"workers": 1}})
    assert pretrain.execution.launcher == "ray_train" and not pretrain.execution.in_process
    proxy = config_lib.from_dict(ProxyConfig, {"execution": {"num_to_keep": 3}, "batch": {"micro_batch_size": 4}})
    assert (proxy.execution.launcher, proxy.execution.threads_per_worker, proxy.batch.seq_len) == ("process", 1, 128)
    sft = config_lib.from_dict(SftConfig, {"sources": [{"path": "x"}], "batch": {"micro_batch_size": 4}})
    assert sft.batch.seq_len == 512 and sft.execution.in_process

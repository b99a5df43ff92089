"""Sweep config without Ray: the space over dotted keys, key checking, values set into configs,
lineage keys that decide which stages trials share, and the best-config YAML."""

from __future__ import annotations

import time

import pytest
import yaml

from llmray import config as config_lib
from llmray import stages
from llmray.config import ConfigError
from llmray.tune import results, space, trial
from llmray.tune.leases import SlotLeases
from llmray.train.pretrain import ProxyConfig
from llmray.tune.sweep import TuneConfig

PROXY = {"data": {"tokens": "/data/shards"}, "tokenizer": None, "train": {"steps": 20}}


def test_flat_and_nested_space_parse_to_the_same_domains():
    flat = space.parse_space({"proxy.train.optimizer.lr": {"loguniform": ["1e-4", 0.1]},
                              "proxy.train.schedule.warmup_steps": {"choice": [0, 10]}})
    nested = space.parse_space({"proxy": {"train": {"optimizer": {"lr": {"loguniform": [1e-4, 0.1]}},
                                                    "schedule": {"warmup_steps": {"choice": [0, 10]}}}}})
    assert flat == nested
    assert flat["proxy.train.optimizer.lr"] == space.Domain("loguniform", (1e-4, 0.1))  # YAML 1.1 string read
    assert not flat["proxy.train.schedule.warmup_steps"].is_grid


@pytest.mark.parametrize("spec, message", [
    ({"a.b": {"uniform": [1.0]}}, "expected 2 numbers"),
    ({"a.b": {"uniform": [2, 1]}}, "must be below"),
    ({"a.b": {"loguniform": [0, 1]}}, "positive low end"),
    ({"a.b": {"randint": [0, 2.5]}}, "integer bounds"),
    ({"a.b": {"choice": []}}, "non-empty list"),
    ({"a.b": 0.1}, "expected a distribution"),
    ({"a.b": {"uniform": ["x", 1]}}, "expected a number, got 'x'"),
    ({}, "at least one key"),
])
def test_bad_distributions_are_rejected_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        space.parse_space(spec)


def test_domains_become_tune_domains():
    from ray import tune

    assert space.Domain("grid", (1, 2)).to_tune() == tune.grid_search([1, 2])
    assert space.Domain("choice", (1, 2)).to_tune(enumerate_choices=True) == tune.grid_search([1, 2])
    lr = space.Domain("loguniform", (1e-4, 1e-1)).to_tune()
    assert isinstance(lr, tune.search.sample.Float) and lr.lower == 1e-4 and lr.upper == 1e-1


def test_keys_are_checked_against_each_stage_config_class():
    classes = {"proxy": ProxyConfig, "curate": stages.STAGES["curate"].config_cls}
    space.check_key("proxy.train.optimizer.lr", classes)
    space.check_key("proxy.model.dim", classes)
    space.check_key("curate.sources.0.max_docs_per_file", classes)  # list items by index
    space.check_key("curate.filters.text_groups", classes)  # a list value swept whole
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        space.check_key("proxy.train.optimizer.lrr", classes)
    with pytest.raises(ConfigError, match="unknown stage 'prxy'.*did you mean 'proxy'"):
        space.check_key("prxy.train.steps", classes)
    with pytest.raises(ConfigError, match="is a section"):
        space.check_key("proxy.train.optimizer", classes)
    with pytest.raises(ConfigError, match="holds a value"):
        space.check_key("proxy.batch.seq_len.x", classes)
    with pytest.raises(ConfigError, match="address an item by index"):
        space.check_key("curate.sources.web.max_docs_per_file", classes)


def test_values_are_set_in_a_copy_of_the_raw_configs():
    base = {"proxy": {"train": {"steps": 20}}, "curate": {"sources": [{"name": "a"}, {"name": "b"}]}}
    changed = space.with_values(base, {"proxy.train.optimizer.lr": 0.01, "curate.sources.1.max_files": 3})
    assert changed["proxy"]["train"] == {"steps": 20, "optimizer": {"lr": 0.01}}
    assert changed["curate"]["sources"][1] == {"name": "b", "max_files": 3}
    assert base["proxy"]["train"] == {"steps": 20} and "max_files" not in base["curate"]["sources"][1]
    with pytest.raises(ConfigError, match="has 2 items, no item 5"):
        space.with_values(base, {"curate.sources.5.max_files": 1})
    with pytest.raises(ConfigError, match="holds a value"):
        space.with_values(base, {"proxy.train.steps.x": 1})


def test_lineage_keys_chain_so_a_change_reaches_every_later_stage_only():
    base = {"curate": {"t": 1}, "tokens": {"n": 2}, "proxy": {"lr": 0.1}}
    keys = trial.lineage_keys(base)
    lr_changed = trial.lineage_keys(space.with_values(base, {"proxy.lr": 0.2}))
    curate_changed = trial.lineage_keys(space.with_values(base, {"curate.t": 5}))
    assert keys[:2] == lr_changed[:2] and keys[2] != lr_changed[2]
    assert all(a != b for a, b in zip(keys, curate_changed))
    assert trial.lineage_keys(dict(base)) == keys  # deterministic


def test_tune_config_validates_stages_keys_search_and_pbt():
    good = {"stages": {"proxy": PROXY}, "space": {"proxy.train.optimizer.lr": {"loguniform": [1e-4, 1e-1]}}}
    cfg = config_lib.from_dict(TuneConfig, good)
    assert cfg.scheduler.kind == "asha" and list(cfg.domains()) == ["proxy.train.optimizer.lr"]
    cases = [
        ({"space": {"proxy.train.optimizer.lrr": {"choice": [1]}}}, "did you mean 'lr'"),
        ({"stages": {"proxi": PROXY}}, "did you mean 'proxy'"),
        ({"stages": {"proxy": {**PROXY, "batch": {"seq_len": 0}}}}, r"stages.proxy: batch.seq_len"),
        ({"search": "nosuch"}, "not one of random, grid"),
        ({"scheduler": {"kind": "pbt"}}, "needs checkpoint.stage"),
        ({"scheduler": {"kind": "pbt", "mutate": ["proxy.x"]}, "checkpoint": {"stage": "proxy"}}, "not keys of space"),
        ({"checkpoint": {"stage": "eval"}}, "not one of the trial's stages"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_lib.from_dict(TuneConfig, {**good, **change})


def test_best_row_prefers_completed_trials_and_yaml_is_ready_to_use(tmp_path):
    rows = [{"trial_id": "a", "metric": 1.0, "status": "stopped", "config": {"proxy.train.optimizer.lr": 1.0}},
            {"trial_id": "b", "metric": 2.0, "status": "completed", "config": {"proxy.train.optimizer.lr": 0.01}},
            {"trial_id": "c", "metric": 3.0, "status": "completed", "config": {"proxy.train.optimizer.lr": 0.1}},
            {"trial_id": "d", "metric": None, "status": "error", "config": {"proxy.train.optimizer.lr": -1}}]
    best = results.best_row(rows, "min")
    assert best["trial_id"] == "b"
    assert results.best_row(rows, "max")["trial_id"] == "c"
    cfg = config_lib.from_dict(TuneConfig, {"stages": {"proxy": PROXY},
                                            "space": {"proxy.train.optimizer.lr": {"choice": [0.01, 0.1]}}})
    text = results.best_config_yaml(cfg, best, "lr")
    loaded = yaml.safe_load(text)
    assert loaded["train"] == {"steps": 20, "optimizer": {"lr": 0.01}}
    proxy = stages.build_config(stages.STAGES["proxy"], loaded, tmp_path)
    assert proxy.train.optimizer.lr == 0.01 and "llmray proxy train --config" in text


def test_run_dir_paths_of_the_sweep_are_rebased_onto_each_stage_lineage_root(tmp_path):
    """{run_dir} in a trial's stage config means that stage's lineage root, not the sweep's run."""
    base = {"tokens": {"documents": "runs/x/curate/output/documents", "tokenizer": "runs/xy/tok"},
            "proxy": {"data": {"tokens": "runs/x/tokens/output"}, "tokenizer": None}}
    slots = trial.stage_slots(base, tmp_path / "stages")
    assert trial.rebase(base["proxy"], "runs/x", slots[1].root) == {
        "data": {"tokens": f"{slots[1].root}/tokens/output"}, "tokenizer": None}
    assert trial.rebase(base["tokens"], "runs/x", slots[0].root)["tokenizer"] == "runs/xy/tok"  # a prefix only
    typed = trial.build_stage_configs({"proxy": {**base["proxy"], "train": {"steps": 5}}},
                                      trial.stage_slots({"proxy": {}}, tmp_path / "stages"), "runs/x",
                                      tmp_path / "runs" / "x")
    assert typed[0][1].data.tokens.endswith("/tokens/output") and str(tmp_path) in typed[0][1].data.tokens


def test_a_trial_stage_reads_earlier_stages_from_their_slots_and_the_rest_from_the_sweep_run(tmp_path):
    """Paths under a slot's {run_dir} are pointed at the folder of the stage they name: the slot of
    an earlier stage of the trial, else the sweep run's own stage (made before the sweep)."""
    run_root = tmp_path / "runs" / "x"
    (run_root / "tokenizer" / "output").mkdir(parents=True)
    (run_root / "tokens").mkdir()  # the trial runs its own tokens: the run's must not be used
    stages_raw = {"curate": {"sources": [{"name": "s", "kind": "jsonl", "paths": ["in/*.jsonl"]}]}, "tokens": {}}
    slots = trial.stage_slots(stages_raw, tmp_path / "stages")
    tokens = trial.build_stage_configs(stages_raw, slots, str(run_root), run_root)[1][1]
    assert tokens.documents == f"{slots[0].stage_dir}/output/documents"
    assert tokens.tokenizer == f"{run_root}/tokenizer/output"


def test_a_slot_lease_waits_for_its_holder_and_lapses_when_the_holder_stops_renewing():
    leases = SlotLeases()
    assert leases.take("slot", "a", ttl_s=60) and not leases.take("slot", "b", ttl_s=60)
    assert leases.take("other", "b", ttl_s=60) and leases.take("slot", "a", ttl_s=60)  # renewal
    leases.give_back("slot", "b")  # not b's to give
    assert not leases.take("slot", "b", ttl_s=60)
    leases.give_back("slot", "a")
    assert leases.take("slot", "b", ttl_s=0.05)
    time.sleep(0.1)  # b died without giving it back
    assert leases.take("slot", "a", ttl_s=60)


def test_the_checkpoint_handed_to_tune_is_a_copy_of_the_newest_complete_one_not_yet_reported(tmp_path):
    """PBT's source of checkpoints: a half-written newest step is passed over for the complete one
    before it, a step already reported is not copied again, and the copy is the trial's own."""
    import torch
    import torch.distributed.checkpoint as dcp

    from llmray.train import checkpoint as ckpt

    slots = trial.stage_slots({"proxy": {}}, tmp_path / "stages")
    plan = trial.TrialPlan(stages={"proxy": {}}, work=tmp_path, run_root=tmp_path / "run", cwd=tmp_path,
                           checkpoint_stage="proxy")
    root = slots[0].stage_dir / plan.checkpoint_subdir
    complete, half_written = root / ckpt.step_dir_name(10), root / ckpt.step_dir_name(20)
    dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(complete))
    for directory in (complete, half_written):
        ckpt.write_trainer_state(directory, 0, {"world_size": 1})
    copy, name = trial._new_checkpoint(slots, plan, reported=None)
    assert name == complete.name and copy != complete and ckpt.is_complete(copy)[0]
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in complete.iterdir())
    assert trial._new_checkpoint(slots, plan, reported=name) == (None, name)

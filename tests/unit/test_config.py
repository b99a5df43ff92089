"""Config loading and validation: the errors a user sees must name the key and what was expected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from llmray.config import (ConfigError, apply_overrides, config_hash, describe, from_dict, load,
                           param, read_yaml)


@dataclass
class OptimConfig:
    lr: float = param(3e-4, doc="peak learning rate", min=0.0)
    warmup_steps: int = param(10, doc="linear warmup steps", min=0)
    schedule: Literal["cosine", "wsd"] = param("cosine", doc="LR schedule")


@dataclass
class ParallelConfig:
    tp: int = param(1, doc="tensor-parallel degree", min=1)


@dataclass
class TrainConfig:
    name: str = param("tiny", doc="run name")
    optim: OptimConfig = param(default_factory=OptimConfig, doc="optimizer")
    parallel: ParallelConfig = param(default_factory=ParallelConfig, doc="parallelism")
    tags: list[str] = param(default_factory=list, doc="free-form tags")
    max_steps: int | None = param(None, doc="stop after this many steps", min=1)


def test_defaults_and_nested_values():
    cfg = from_dict(TrainConfig, {"optim": {"lr": 1e-3}, "tags": ["a"]})
    assert cfg.optim.lr == 1e-3 and cfg.optim.warmup_steps == 10 and cfg.tags == ["a"]


def test_misspelled_key_names_closest_valid_spelling():
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"optim": {"lrr": 1e-3}})
    assert "optim.lrr" in str(err.value) and "did you mean 'lr'" in str(err.value)


def test_misspelled_section_names_closest_valid_spelling():
    with pytest.raises(ConfigError, match=r"unknown config key 'paralel'; did you mean 'parallel'"):
        from_dict(TrainConfig, {"paralel": {"tp": 2}})


def test_wrong_type_names_key_value_and_expectation():
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps: expected an integer, got 'ten'"):
        from_dict(TrainConfig, {"optim": {"warmup_steps": "ten"}})
    with pytest.raises(ConfigError, match=r"parallel: expected a mapping"):
        from_dict(TrainConfig, {"parallel": 2})


def test_out_of_range_and_bad_choice():
    with pytest.raises(ConfigError, match=r"parallel\.tp: value 0 is out of range; expected >= 1"):
        from_dict(TrainConfig, {"parallel": {"tp": 0}})
    with pytest.raises(ConfigError, match=r"optim\.schedule: value 'linear' is not one of 'cosine', 'wsd'"):
        from_dict(TrainConfig, {"optim": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match=r"max_steps: value 0 is out of range"):
        from_dict(TrainConfig, {"max_steps": 0})


def test_yaml_scientific_notation_string_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n")  # YAML 1.1 reads this as the string '3e-4'
    assert load(TrainConfig, path).optim.lr == pytest.approx(3e-4)


def test_dotted_overrides_apply_with_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n")
    cfg = load(TrainConfig, path, ["optim.lr=3e-4", "parallel.tp=2", "tags=[x, y]"])
    assert (cfg.optim.lr, cfg.parallel.tp, cfg.tags) == (pytest.approx(3e-4), 2, ["x", "y"])
    with pytest.raises(ConfigError, match="did you mean 'tp'"):
        load(TrainConfig, path, ["parallel.pt=2"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_overrides({}, ["optim.lr"])


def test_include_merges_underneath_and_detects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\noptim:\n  lr: 1.0\n  warmup_steps: 5\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\noptim:\n  lr: 2.0\n")
    assert read_yaml(tmp_path / "child.yaml") == {"name": "base", "optim": {"lr": 2.0, "warmup_steps": 5}}
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        read_yaml(tmp_path / "a.yaml")


def test_bad_yaml_and_missing_file_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")


def test_hash_changes_with_any_value_and_describe_lists_docs():
    assert config_hash(TrainConfig()) == config_hash(TrainConfig())
    assert config_hash(TrainConfig()) != config_hash(from_dict(TrainConfig, {"optim": {"lr": 1e-3}}))
    rows = {key: doc for key, _, doc in describe(TrainConfig)}
    assert rows["optim.lr"] == "peak learning rate" and "parallel.tp" in rows

"""Every YAML shipped under configs/ loads and validates against its typed config.

A config folder maps to the config class that reads it; a new folder must be added here, so no
shipped file can drift out of sync with its code unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmray import config as config_lib
from llmray import stages
from llmray.pipeline import PipelineConfig, typed_stage_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FOLDER_TO_STAGE = {"data": "curate", "tokenizer": "tokenizer", "tokens": "tokens", "train": "pretrain",
                   "sft": "sft", "dpo": "dpo", "reward": "reward", "rl": "rl", "eval": "eval", "tune": "tune"}
FILE_TO_STAGE = {"data/classifiers.yaml": "classifier"}  # a file whose stage differs from its folder's


def _shipped() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert _shipped(), f"no YAML files under {CONFIGS}"


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_validates(path, tmp_path):
    folder = path.relative_to(CONFIGS).parts[0]
    raw = config_lib.read_yaml(path)
    if folder == "pipeline":
        cfg = config_lib.from_dict(PipelineConfig, raw)
        assert typed_stage_configs(cfg, tmp_path / cfg.name)
    elif folder == "model":
        from llmray.model.config import ModelConfig

        config_lib.from_dict(ModelConfig, raw)
    else:
        assert folder in FOLDER_TO_STAGE, f"configs/{folder}/ has no known config class; add it to this test"
        name = FILE_TO_STAGE.get(str(path.relative_to(CONFIGS)), FOLDER_TO_STAGE[folder])
        stage = stages.STAGES.get(name)
        assert stage is not None, f"{path} configures stage '{name}', which is not registered"
        stages.build_config(stage, raw, tmp_path)

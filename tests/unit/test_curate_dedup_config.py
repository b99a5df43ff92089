"""The curate stage's dedup section: eval tasks whose files are missing are skipped (the demo runs
without ../shared/data), the funnel lists the dedup stages, boilerplate removal and flag mode are
accepted."""

from __future__ import annotations

import pytest

from llmray import config as config_lib
from llmray.data import curate


def _cfg(tmp_path, **dedup):
    return config_lib.from_dict(curate.CurateConfig, {"dedup": {"decontam": {"data_dir": str(tmp_path)}, **dedup}})


def test_missing_eval_data_turns_decontamination_off_with_notes(tmp_path):
    cfg = _cfg(tmp_path / "absent")
    effective, notes = curate.effective_dedup(cfg.dedup)
    assert not effective.decontam.enabled and cfg.dedup.decontam.enabled
    assert any("arc" in n for n in notes) and "decontamination is off" in notes[-1]
    assert not any(k.startswith("decontam.") for k in cfg.inputs())


def test_present_task_files_are_kept_and_fingerprinted(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"q": "a question long enough to be indexed by the n-gram index"}\n')
    cfg = _cfg(tmp_path, decontam={"data_dir": str(tmp_path), "tasks": {"mine": ["mine.jsonl"],
                                                                        "gone": ["gone.jsonl"]}})
    effective, notes = curate.effective_dedup(cfg.dedup)
    assert effective.decontam.enabled and list(effective.decontam.tasks) == ["mine"]
    assert notes == [f"decontamination: skipping task 'gone': missing {tmp_path / 'gone.jsonl'}"]
    assert cfg.inputs()["decontam.mine.0"] == str(tmp_path / "mine.jsonl")
    assert cfg.stage_order()[-4:] == ["boilerplate", "exact_dedup", "near_dedup", "decontamination"]


def test_dedup_off_by_default_boilerplate_and_flag_accepted(tmp_path):
    assert curate.CurateConfig().dedup is None and "exact_dedup" not in curate.CurateConfig().stage_order()
    cfg = _cfg(tmp_path, boilerplate={"enabled": True, "min_words": 5}, decontam={"action": "flag"})
    assert cfg.dedup.boilerplate.enabled and cfg.dedup.decontam.action == "flag"
    assert cfg.dedup.boilerplate.reject_reason() == "too_short_after_boilerplate"
    assert _cfg(tmp_path).dedup.boilerplate.reject_reason() == "empty_after_boilerplate"
    with pytest.raises(ValueError):
        _cfg(tmp_path, decontam={"action": "mark"})

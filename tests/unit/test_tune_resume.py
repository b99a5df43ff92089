"""Which start a sweep takes, without Ray: restore an interrupted sweep, start a new one, or refuse;
an interrupted sweep is never deleted."""

from __future__ import annotations

import re

import pytest

from llmray import config as config_lib
from llmray.tune import sweep

PROXY = {"data": {"tokens": "/data/shards"}, "tokenizer": None, "train": {"steps": 20}}
KEY = "a" * 64


def tune_config(**values) -> sweep.TuneConfig:
    raw = {"stages": {"proxy": PROXY}, "space": {"proxy.train.optimizer.lr": {"grid": [1e-3, 1e-2]}}, **values}
    return config_lib.from_dict(sweep.TuneConfig, raw, "tune")


def folder(tmp_path, *, finished: bool | None = None, key: str = KEY):
    """A tune work directory; ``finished=None``: no sweep record (an older llmray started it)."""
    if finished is not None:
        sweep.record_sweep(tmp_path, key, finished=finished)
    return tmp_path


@pytest.mark.parametrize("resume", ["auto", False])
def test_no_sweep_or_a_finished_one_starts_a_new_sweep(tmp_path, resume):
    assert sweep.plan_start(resume, folder(tmp_path), KEY, restorable=False) == "fresh"
    assert sweep.plan_start(resume, folder(tmp_path, finished=True), KEY, restorable=True) == "fresh"


def test_resume_true_needs_an_interrupted_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume=true, but .*sweep holds no interrupted sweep"):
        sweep.plan_start(True, folder(tmp_path), KEY, restorable=False)
    with pytest.raises(FileNotFoundError, match="no interrupted sweep"):
        sweep.plan_start(True, folder(tmp_path, finished=True), KEY, restorable=True)


@pytest.mark.parametrize("resume", ["auto", True])
def test_an_interrupted_sweep_of_the_same_config_is_restored(tmp_path, resume):
    assert sweep.plan_start(resume, folder(tmp_path, finished=False), KEY, restorable=True) == "restore"


def test_resume_false_refuses_an_interrupted_sweep_and_names_what_to_delete(tmp_path):
    work = folder(tmp_path, finished=False)
    with pytest.raises(FileExistsError) as info:
        sweep.plan_start(False, work, KEY, restorable=True)
    message = str(info.value)
    assert "resume=auto" in message and str(sweep.experiment_path(work)) in message
    assert str(work / "trials") in message


@pytest.mark.parametrize("record", [{"finished": False, "key": "b" * 64}, {"finished": None}])
@pytest.mark.parametrize("resume", ["auto", True])
def test_an_interrupted_sweep_of_another_or_unknown_config_is_refused(tmp_path, resume, record):
    with pytest.raises(FileExistsError, match="another config .* delete"):
        sweep.plan_start(resume, folder(tmp_path, **record), KEY, restorable=True)


def test_resume_parses_true_false_and_auto_and_is_not_part_of_the_sweep_key():
    assert tune_config().resume == "auto"
    assert [tune_config(resume=v).resume for v in (True, False, "auto")] == [True, False, "auto"]
    with pytest.raises(config_lib.ConfigError, match=re.escape("tune.resume: value 'yes' matches none of bool | 'auto'")):
        tune_config(resume="yes")
    assert len({sweep.sweep_key(tune_config(resume=v)) for v in (True, False, "auto")}) == 1
    assert sweep.sweep_key(tune_config(num_samples=2)) != sweep.sweep_key(tune_config())

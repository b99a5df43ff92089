"""The stage runner: lineage skip, re-run on change, atomic outputs, failure leaves old outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmray import stages
from llmray.config import ConfigError, from_dict, param
from llmray.pipeline import PipelineConfig, run_pipeline

CALLS: list[str] = []


@dataclass
class UpperConfig:
    """A real (small) stage: upper-cases a text file, optionally failing halfway."""

    source: str = param(doc="input text file")
    repeat: int = param(1, doc="times to repeat the text", min=1)
    fail: bool = param(False, doc="raise after writing part of the output")

    def inputs(self) -> dict[str, str]:
        return {"source": self.source}


def run_upper(cfg: UpperConfig, ctx: stages.StageContext) -> dict:
    CALLS.append(ctx.stage)
    text = Path(cfg.source).read_text().upper() * cfg.repeat
    (ctx.output / "upper.txt").write_text(text)
    if cfg.fail:
        raise RuntimeError("stage failed on purpose")
    ctx.log_metrics(chars=len(text))
    logging.getLogger("llmray.data.example").info("upper-cased %d chars", len(text))
    return {"chars": len(text)}


UPPER = stages.Stage("upper", "upper-case a file", f"{__name__}:UpperConfig", f"{__name__}:run_upper")


@pytest.fixture
def source(tmp_path):
    CALLS.clear()
    path = tmp_path / "in.txt"
    path.write_text("hello")
    return path


def test_unchanged_inputs_and_config_skip(tmp_path, source):
    cfg = UpperConfig(source=str(source))
    first = stages.run_stage(UPPER, cfg, tmp_path / "run")
    second = stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run")
    assert not first.skipped and second.skipped and CALLS == ["upper"]
    assert "unchanged" in second.reason
    manifest = second.manifest
    assert manifest["status"] == "complete" and manifest["summary"] == {"chars": 5}
    assert manifest["outputs"]["upper.txt"]["bytes"] == 5
    assert (tmp_path / "run" / "upper" / "config.yaml").read_text().startswith("source:")
    log_text = (tmp_path / "run" / "upper" / "stage.log").read_text()
    assert "running stage upper" in log_text and "upper-cased 5 chars" in log_text


def test_changing_one_config_value_reruns(tmp_path, source):
    stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run")
    result = stages.run_stage(UPPER, UpperConfig(source=str(source), repeat=2), tmp_path / "run")
    assert not result.skipped and CALLS == ["upper", "upper"]
    assert result.reason.startswith("config changed") and result.manifest["ran_because"] == result.reason
    assert (result.output / "upper.txt").read_text() == "HELLOHELLO"


def test_changing_input_content_reruns(tmp_path, source):
    stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run")
    source.write_text("bye")
    result = stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run")
    assert not result.skipped and (result.output / "upper.txt").read_text() == "BYE"
    assert result.reason == "inputs changed: source"


def test_deleted_output_reruns_and_force_reruns(tmp_path, source):
    first = stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run")
    assert first.reason == "no previous run"
    (first.output / "upper.txt").unlink()
    again = stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run")
    assert not again.skipped and again.reason == "output upper.txt is missing or changed"
    assert stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run", force=True).reason == "--force"
    assert len(CALLS) == 3


def test_failed_stage_keeps_previous_outputs_and_is_not_cached(tmp_path, source):
    stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run")
    with pytest.raises(RuntimeError, match="on purpose"):
        stages.run_stage(UPPER, UpperConfig(source=str(source), repeat=3, fail=True), tmp_path / "run")
    stage_dir = tmp_path / "run" / "upper"
    assert (stage_dir / "output" / "upper.txt").read_text() == "HELLO"
    assert not (stage_dir / "output.partial").exists()
    manifest = stages.runs.StageDir(stage_dir, "upper").read_manifest()
    assert manifest["status"] == "failed" and "on purpose" in manifest["error"]
    assert not stages.run_stage(UPPER, UpperConfig(source=str(source)), tmp_path / "run").skipped


def test_pipeline_validates_every_stage_before_running(tmp_path, source, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "upper", UPPER)
    good = {"source": str(source)}
    with pytest.raises(ConfigError, match=r"unknown stage 'stages.uper'; did you mean 'upper'"):
        PipelineConfig(stages={"uper": good})
    with pytest.raises(ConfigError, match=r"stages.upper: expected a mapping, got 'x'"):
        from_dict(PipelineConfig, {"stages": {"upper": "x"}})
    cfg = PipelineConfig(name="p", stages={"upper": {"source": str(source), "repat": 2}})
    with pytest.raises(ConfigError, match=r"in stages.upper: unknown config key 'repat'; did you mean 'repeat'"):
        run_pipeline(cfg, tmp_path)
    assert CALLS == []


def test_pipeline_runs_then_skips_and_substitutes_run_dir(tmp_path, source, monkeypatch):
    monkeypatch.setitem(stages.STAGES, "upper", UPPER)
    cfg = from_dict(PipelineConfig, {"name": "p", "stages": {"upper": {"source": str(source)}}})
    assert [r.skipped for r in run_pipeline(cfg, tmp_path)] == [False]
    assert [r.skipped for r in run_pipeline(cfg, tmp_path)] == [True]
    raw = {"source": "{run_dir}/upper/output/upper.txt"}
    typed = stages.build_config(UPPER, raw, tmp_path / "p")
    assert typed.source == f"{tmp_path}/p/upper/output/upper.txt"


@dataclass
class DefaultInputConfig:
    documents: str = param("{run_dir}/curate/output/documents", doc="input with a run-relative default")


def test_run_dir_in_defaults_is_resolved(tmp_path):
    stage = stages.Stage("d", "d", f"{__name__}:DefaultInputConfig", f"{__name__}:run_upper")
    assert stages.build_config(stage, {}, tmp_path / "r").documents == f"{tmp_path}/r/curate/output/documents"

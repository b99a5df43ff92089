"""The CLI: help for every command, config errors reported with the key and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmray import cli, stages


def _llmray(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmray.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_top_level_help_lists_every_stage_and_pipeline():
    proc = _llmray("--help")
    assert proc.returncode == 0, proc.stderr
    for name in [*stages.STAGES, "pipeline"]:
        assert name in proc.stdout


def _stage_commands() -> list[list[str]]:
    commands = [["pipeline"]]
    commands += [[s.name, s.verb] if s.verb else [s.name] for s in stages.STAGES.values()]
    return commands + [[name] for name in cli.TOOLS]


@pytest.mark.parametrize("command", _stage_commands(), ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: llmray" in out
    if command[0] in stages.STAGES or command == ["pipeline"]:
        assert "config keys" in out


def test_misspelled_pipeline_key_exits_2_naming_key_and_closest(tmp_path, capsys):
    config = tmp_path / "p.yaml"
    config.write_text("nmae: demo\nstages: {}\n")
    assert cli.main(["pipeline", "--config", str(config), "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'nmae'; did you mean 'name'?" in err


def test_bad_override_value_exits_2(tmp_path, capsys):
    config = tmp_path / "p.yaml"
    config.write_text("name: demo\nstages: {}\n")
    assert cli.main(["pipeline", "--config", str(config), "ray.num_cpus=zero"]) == 2
    assert "ray.num_cpus: expected an integer, got 'zero'" in capsys.readouterr().err


def test_relative_runs_dir_becomes_absolute(tmp_path, monkeypatch):
    """Ray workers and Ray Train storage run in other directories: a relative root would break them."""
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser("pretrain").parse_args(["pretrain", "--runs-dir", "runs"])
    assert args.runs_dir == tmp_path / "runs"


def test_mlflow_flags_override_the_configs_tracking_section(monkeypatch):
    from llmray import pipeline
    from llmray.tracking import TrackingConfig

    monkeypatch.delenv("LLMRAY_MLFLOW_URI", raising=False)
    configured = TrackingConfig(mlflow_uri="file:///from/config", experiment="cfg")
    plain = cli.build_parser().parse_args(["curate"])
    assert pipeline._tracking(plain, configured) == configured and not pipeline._tracking(plain).enabled
    flagged = cli.build_parser().parse_args(["pipeline", "--mlflow-uri", "file:///tmp/mlruns",
                                             "--mlflow-experiment", "ablation"])
    assert pipeline._tracking(flagged, configured) == TrackingConfig("file:///tmp/mlruns", "ablation")

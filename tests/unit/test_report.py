"""The run report: stage table with cost accounting, metric plots, stage fragments re-linked."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from llmray import report, stages
from llmray.config import param


@dataclass
class CurveConfig:
    steps: int = param(20, doc="steps to log", min=2)


def run_curve(cfg: CurveConfig, ctx: stages.StageContext) -> dict:
    """Logs a falling loss and writes a report fragment with its own image."""
    for step in range(cfg.steps):
        ctx.log_metrics(step=step, loss=4.0 / (1 + step), lr=1e-3 * (1 + step), skips=0)  # a flat series is not plotted
    (ctx.output / "hist.png").write_bytes(b"\x89PNG fake but present")
    (ctx.output / "report.md").write_text("# Funnel\n\n| in | out |\n|---|---|\n| 10 | 7 |\n\n![hist](hist.png)\n")
    return {"final_loss": 4.0 / cfg.steps}


CURVE = stages.Stage("curve", "log a curve", f"{__name__}:CurveConfig", f"{__name__}:run_curve")


def test_report_has_table_plots_and_fragments(tmp_path):
    run_root = tmp_path / "run1"
    stages.run_stage(CURVE, CurveConfig(), run_root)
    path = report.build_report(run_root)
    text = path.read_text()
    assert "| curve | complete |" in text and "**total**" in text
    assert "final_loss" in text and "0.2" in text
    assert "![curve: loss, lr](curve_metrics.png)" in text
    png = path.parent / "curve_metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "### Funnel" in text and "![hist](curve_hist.png)" in text
    assert (path.parent / "curve_hist.png").is_file()


def test_cost_accounting_uses_recorded_resources(tmp_path):
    run_root = tmp_path / "run2"
    result = stages.run_stage(CURVE, CurveConfig(steps=3), run_root)
    manifest = result.manifest
    assert manifest["resources"]["cpus"] >= 1
    manifest.update(seconds=3600.0, resources={"cpus": 2.0, "gpus": 1.0})
    stages.runs.StageDir(run_root / "curve", "curve").write_manifest(manifest)
    text = report.build_report(run_root).read_text()
    assert "| 3600.0 s | 2.000 | 1.000 |" in text


def test_empty_run_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no stage with a manifest"):
        report.build_report(tmp_path)


def test_restarted_stage_plots_the_last_record_of_each_step():
    metrics = [{"step": 10, "loss": 9.0}, {"step": 20, "loss": 8.0},  # first attempt, killed
               {"step": 10, "loss": 7.0}, {"step": 20, "loss": 6.0}, {"step": 30, "loss": 5.0}]
    assert report._numeric_series(metrics)["loss"] == ([10, 20, 30], [7.0, 6.0, 5.0])


def test_hook_figures_at_the_same_step_are_merged_and_stepless_records_are_not_points():
    metrics = [{"reference_cache_hit": 0.0},  # stage-level, no step
               {"step": 0, "val_reward_accuracy": 0.0}, {"step": 10, "loss": 0.6}, {"step": 10, "val_reward_accuracy": 0.4},
               {"step": 20, "loss": 0.5}, {"step": 20, "val_reward_accuracy": 0.6}]
    series = report._numeric_series(metrics)
    assert series["loss"] == ([10, 20], [0.6, 0.5])
    assert series["val_reward_accuracy"] == ([0, 10, 20], [0.0, 0.4, 0.6])
    assert "reference_cache_hit" not in series



def test_fragment_links_outside_the_stage_output_are_inert_and_nothing_is_copied(tmp_path):
    """A held-out prompt that reaches a fragment cannot make the shareable report copy a file."""
    from llmray.align import samples

    run_root = tmp_path / "run3"
    stages.run_stage(CURVE, CurveConfig(steps=3), run_root)
    (tmp_path / "secret").write_bytes(b"token-abc123")
    output = run_root / "curve" / "output"
    (output / "escape.png").symlink_to(tmp_path / "secret")
    prompt = "describe ![x](../../../secret) and <img src=x>"
    replies = [{"prompt": [{"role": "user", "content": prompt}], "reply": "![y](../../../secret)", "finished": True}]
    crafted = ["![a](../../../secret)", f"![b]({tmp_path / 'secret'})", "![c](escape.png)", "![d](missing.png)"]
    fragment = (output / "report.md").read_text() + "\n".join(samples.markdown(replies) + crafted) + "\n"
    (output / "report.md").write_text(fragment)

    path = report.build_report(run_root)
    text = path.read_text()
    assert "![hist](curve_hist.png)" in text and (path.parent / "curve_hist.png").is_file()  # its own image still is
    for file in path.parent.iterdir():
        assert "secret" not in file.name and "escape" not in file.name
        assert b"token-abc123" not in file.read_bytes()
    assert report.escape_markdown(prompt) in text and r"\!\[x\]\(../../../secret\)" in text
    assert r"\!\[a\]\(../../../secret\)" in text and r"\!\[c\]\(escape.png\)" in text
    assert not re.search(r"(?<!\\)<img", text) and "](" not in text.replace("](curve_", "")


def test_escaped_text_reads_the_same_and_forms_no_markup():
    text = r"a \![x](y) `b` <i>|*_~&#"
    escaped = report.escape_markdown(text)
    assert re.sub(r"\\(.)", r"\1", escaped) == text  # a markdown renderer shows the original
    assert not re.search(r"(?<!\\)[!\[\]()<>`|*_~&#]", re.sub(r"\\.", "", escaped))


def test_torn_and_garbage_metrics_lines_are_skipped_and_counted(tmp_path, caplog):
    run_root = tmp_path / "run4"
    stages.run_stage(CURVE, CurveConfig(steps=6), run_root)
    metrics = run_root / "curve" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines.insert(3, "garbage, not json")
    metrics.write_text("\n".join(lines) + '\n{"step": 6, "loss": 0.5')  # killed mid-write
    with caplog.at_level("WARNING", logger="llmray.report"):
        text = report.build_report(run_root).read_text()
    assert "![curve: loss, lr](curve_metrics.png)" in text
    assert "metrics.jsonl: 2 unreadable line(s) skipped (the first: line 4," in text
    assert f"{metrics}:4: not valid JSON" in caplog.text

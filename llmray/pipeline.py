"""``llmray pipeline`` and the glue that turns CLI arguments into stage runs.

A pipeline config names the run, how to reach Ray, and one section per stage (in run order),
each validated by that stage's own config class before anything runs, so a typo in the last
stage fails in the first second rather than after an hour of curation::

    name: tiny
    ray: {num_cpus: 2}
    stages:
      tokenizer:
        include: ../tokenizer/tiny.yaml
        vocab_size: 4096
"""

from __future__ import annotations

import argparse
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmray import cluster, report, runs, storage
from llmray import config as config_lib
from llmray import stages as stages_lib
from llmray.config import param
from llmray.tracking import TrackingConfig

log = logging.getLogger("llmray")


@dataclass
class PipelineConfig:
    """A whole run: its name, Ray connection and the config of each stage, in order."""

    name: str = param("default", doc="run name: outputs go to <runs-dir>/<name>/<stage>/")
    ray: cluster.RayConfig = param(default_factory=cluster.RayConfig, doc="how to reach Ray")
    tracking: TrackingConfig = param(default_factory=TrackingConfig, doc="MLflow: each stage becomes an MLflow "
                                                                         "run when it ends")
    stages: dict[str, dict] = param(default_factory=dict,
                                    doc="stage name -> that stage's config, run in this order")

    def __post_init__(self) -> None:
        for name in self.stages:
            if name not in stages_lib.STAGES:
                close = difflib.get_close_matches(name, list(stages_lib.STAGES), n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else \
                    f"; stages that exist: {', '.join(stages_lib.STAGES) or 'none'}"
                raise config_lib.ConfigError(f"unknown stage 'stages.{name}'{hint}")


def typed_stage_configs(cfg: PipelineConfig, run_root: Path | str) -> list[tuple[stages_lib.Stage, Any]]:
    """Validate every stage section up front; errors name the full dotted key."""
    typed = []
    for name, raw in cfg.stages.items():
        stage = stages_lib.STAGES[name]
        try:
            typed.append((stage, stages_lib.build_config(stage, raw or {}, run_root)))
        except config_lib.ConfigError as exc:
            raise config_lib.ConfigError(f"in stages.{name}: {exc}") from exc
    return typed


def _ray_config(args: argparse.Namespace, base: cluster.RayConfig | None = None) -> cluster.RayConfig:
    ray_cfg = base or cluster.RayConfig()
    if args.address:
        ray_cfg.address = args.address
    if args.num_cpus:
        ray_cfg.num_cpus = args.num_cpus
    return ray_cfg


def _tracking(args: argparse.Namespace, base: TrackingConfig | None = None) -> TrackingConfig:
    """The command line's MLflow settings, over the config's when given."""
    if args.mlflow_uri:
        return TrackingConfig(mlflow_uri=args.mlflow_uri, experiment=args.mlflow_experiment)
    return base or TrackingConfig()


def _raw_config(args: argparse.Namespace) -> dict:
    raw = config_lib.read_yaml(args.config) if args.config else {}
    return config_lib.apply_overrides(raw, args.overrides)


def run_stage_command(stage: stages_lib.Stage, args: argparse.Namespace) -> stages_lib.StageResult:
    run_name = args.run or (args.config.stem if args.config else stage.name)
    run_root = runs.run_root(args.runs_dir, run_name)
    cfg = stages_lib.build_config(stage, _raw_config(args), run_root)
    result = stages_lib.run_stage(stage, cfg, run_root, _ray_config(args), force=args.force,
                                  tracking=_tracking(args))
    _print_results([result], run_root)
    return result


def run_pipeline(cfg: PipelineConfig, runs_dir: Path | str, force: bool = False) -> list[stages_lib.StageResult]:
    run_root = runs.run_root(runs_dir, cfg.name)
    results = []
    typed = typed_stage_configs(cfg, run_root)
    if not typed:
        raise config_lib.ConfigError("the pipeline config lists no stages under 'stages'")
    for index, (stage, stage_cfg) in enumerate(typed, 1):
        log.info("pipeline %s: stage %d/%d: %s", cfg.name, index, len(typed), stage.name)
        results.append(stages_lib.run_stage(stage, stage_cfg, run_root, cfg.ray, force=force, tracking=cfg.tracking))
    return results


def run_pipeline_command(args: argparse.Namespace) -> list[stages_lib.StageResult]:
    cfg = config_lib.from_dict(PipelineConfig, _raw_config(args))
    if args.run:
        cfg.name = args.run
    cfg.ray = _ray_config(args, cfg.ray)
    cfg.tracking = _tracking(args, cfg.tracking)
    results = run_pipeline(cfg, args.runs_dir, force=args.force)
    run_root = runs.run_root(args.runs_dir, cfg.name)
    _print_results(results, run_root)
    print(f"report: {storage.normalize(report.build_report(run_root))}")
    return results


def _print_results(results: list[stages_lib.StageResult], run_root: Path | str) -> None:
    print(f"\nrun directory: {storage.normalize(run_root)}")
    for result in results:
        state = "skipped (unchanged)" if result.skipped else "ran"
        print(f"  {result.stage:<12} {state:<20} outputs: {storage.normalize(result.output)}")
    connection = cluster.current_connection()
    if connection:
        print(cluster.describe(connection))

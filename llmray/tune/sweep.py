"""``llmray tune``: a Ray Tune sweep over any config key of any stage.

A sweep config names the stages a trial runs (raw stage configs, ``include:`` allowed, exactly
as under ``stages:`` of a pipeline config), the search space over their dotted keys
(:mod:`llmray.tune.space`), the metric, the search algorithm and the scheduler::

    stages:
      proxy: {model: {include: ../model/tiny.yaml}, train: {steps: 200}}
    space:
      proxy.train.optimizer.lr: {loguniform: [1.0e-4, 3.0e-1]}
    metric: val_loss
    scheduler: {kind: asha, time_attr: step, max_t: 200, grace_period: 20}

Design choices:

* **Trials are function trainables** (:func:`llmray.tune.trial.run_trial`) that run stages
  through ``run_stage``; a stage that starts its own Ray Train workers or Ray Data tasks does so
  from inside the trial (Ray Train V2 refuses a ``TorchTrainer`` as a Tune trainable), and the
  trial itself then only needs ``resources.cpu: 0.01``.
* **Search**: ``random`` (Tune's basic variant generator, seeded; ``grid`` keys enumerated),
  ``grid`` (every ``choice`` enumerated too), or a model-based searcher by name when its library
  is installed (optuna, hyperopt, ...). **Schedulers**: ASHA (default), PBT (needs a checkpoint
  stage: exploited trials restart from the winner's checkpoint with mutated values), FIFO.
* **Resume**: the Tune experiment lives in ``work/ray_results/sweep``, and ``sweep.json`` beside
  it records the config it was started from and whether it finished. An interrupted sweep is
  continued with ``Tuner.restore`` (``resume=auto``, the default, or ``true``): finished trials
  keep their results and are not run again, unfinished ones restart and find their finished
  stages in the lineage cache and their training checkpoints in their stage's work directory.
  It is never deleted: ``resume=false``, or a changed config, refuses to run and names the
  folder to delete (:func:`plan_start`). A *finished* sweep is replaced by a new one: the stage
  reruns only when its config changed or on ``--force``, and its results are in the output
  (the stage cache is kept: unchanged stages are still reused).
* **Storage**: the run directory may be on an object store (``--runs-dir s3://...``): the Tune
  experiment, the trials' stage slots and records, and the outputs are all locations there.
* **Outputs** (:mod:`llmray.tune.results`): ``trials.csv``/``trials.md`` (config, metric,
  status, steps, error), ``best_config.yaml`` ready to run, plots, and ``report.md``, which the
  run report includes.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmray import config as config_lib
from llmray import runs, storage
from llmray import stages as stages_lib
from llmray.config import param
from llmray.tune import leases
from llmray.tune import space as space_lib
from llmray.tune import trial as trial_lib

log = logging.getLogger("llmray.tune")
EXPERIMENT = "sweep"
RAY_RESULTS = "ray_results"

# search name -> (module that must be importable, Tune searcher name)
SEARCHERS = {"optuna": "optuna", "hyperopt": "hyperopt", "bayesopt": "bayes_opt", "hebo": "hebo",
             "nevergrad": "nevergrad", "ax": "ax", "zoopt": "zoopt"}


@dataclass
class SchedulerConfig:
    """Which trials to stop early (ASHA), exploit (PBT), or let run (FIFO)."""

    kind: Literal["asha", "pbt", "fifo"] = param("asha", doc="asha: successive halving; pbt: population-"
                                                             "based training; fifo: run every trial to the end")
    time_attr: str = param("step", doc="the reported value that measures progress (step, training_iteration)")
    max_t: int = param(1000, doc="asha: the longest a trial runs, in time_attr units", min=1)
    grace_period: int = param(10, doc="asha: no trial is stopped before this, in time_attr units", min=1)
    reduction_factor: float = param(3.0, doc="asha: keep the best 1/reduction_factor at each rung", min=1.01)
    perturbation_interval: int = param(50, doc="pbt: exploit/explore every this many time_attr units", min=1)
    mutate: list[str] = param(default_factory=list, doc="pbt: space keys to mutate (empty: every non-grid key)")
    quantile_fraction: float = param(0.25, doc="pbt: bottom fraction that copies the top fraction", min=0.0,
                                     max=0.5)
    resample_probability: float = param(0.25, doc="pbt: chance a mutation resamples instead of perturbing",
                                        min=0.0, max=1.0)


@dataclass
class TrialResources:
    """What one trial reserves (its stages' own Ray tasks/workers reserve theirs separately)."""

    cpu: float = param(1.0, doc="CPUs per trial (0.01 when the stages start their own Ray workers)", min=0.01)
    gpu: float = param(0.0, doc="GPUs per trial (fractions share a GPU)", min=0.0)


@dataclass
class TuneCheckpointConfig:
    """Which stage's checkpoints Tune keeps, so PBT can hand them between trials."""

    stage: str | None = param(None, doc="stage whose checkpoints are reported to Tune (needed by pbt)")
    subdir: str = param("work/checkpoints", doc="where that stage writes step_* checkpoints, relative to "
                                                "its stage directory")
    restore_key: str = param("resume_from", doc="that stage's config key set to a checkpoint Tune hands back")


@dataclass
class TuneConfig:
    """A sweep: the stages each trial runs, the space over their keys, the search and the scheduler."""

    stages: dict[str, dict[str, Any]] = param(default_factory=dict, doc="stage name -> base config, in run order "
                                                                "(as under stages: of a pipeline config)")
    space: dict[str, Any] = param(default_factory=dict, doc="dotted key '<stage>.<key path>' -> "
                                  "{choice|grid: [values]} or {uniform|loguniform|randint|...: [low, high]}")
    metric: str = param("val_loss", doc="reported metric to optimise, e.g. val_loss or eval.base.core")
    mode: Literal["min", "max"] = param("min", doc="minimise or maximise the metric")
    search: str = param("random", doc="random, grid, or a searcher whose library is installed: "
                                      + ", ".join(SEARCHERS))
    num_samples: int = param(4, doc="trials to sample (with grid keys: repeats of the whole grid)", min=1)
    seed: int = param(0, doc="seed of random search")
    scheduler: SchedulerConfig = param(default_factory=SchedulerConfig, doc="early stopping / PBT")
    resources: TrialResources = param(default_factory=TrialResources, doc="per-trial resources")
    max_concurrent_trials: int | None = param(None, doc="most trials at once (null: as resources allow)", min=1)
    time_budget_s: float | None = param(None, doc="stop the sweep after this many seconds (null: no limit)",
                                        min=1.0)
    max_failures: int = param(0, doc="retries of a trial that fails (a bad config value fails every time)",
                              min=0)
    checkpoint: TuneCheckpointConfig = param(default_factory=TuneCheckpointConfig, doc="trial checkpoints")
    table_metrics: list[str] = param(default_factory=list, doc="further reported metrics shown per trial in "
                                     "the results table, e.g. curate.documents, eval.base.core")
    resume: bool | Literal["auto"] = param("auto", doc="auto: continue the interrupted sweep in work/ "
                                           "(Tuner.restore: finished trials are kept, unfinished ones resume), "
                                           "else start one; true: continue it, fail if there is none; false: "
                                           "start a new sweep, fail if an interrupted one is there")

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: name at least one stage a trial runs, e.g. stages: {proxy: {...}}")
        for name, raw in self.stages.items():
            if name not in stages_lib.STAGES or name == "tune":
                close = difflib.get_close_matches(name, list(stages_lib.STAGES), n=1, cutoff=0.5)
                raise ValueError(f"stages.{name}: not a stage a trial can run"
                                 + (f"; did you mean '{close[0]}'?" if close else ""))
            try:
                stages_lib.build_config(stages_lib.STAGES[name], raw or {}, Path("{run_dir}"))
            except config_lib.ConfigError as exc:
                raise ValueError(f"stages.{name}: {exc}") from exc
        domains = self.domains()
        classes = {name: stages_lib.STAGES[name].config_cls for name in self.stages}
        for key in domains:
            space_lib.check_key(key, classes)
        if self.search not in ("random", "grid") and self.search not in SEARCHERS:
            raise ValueError(f"search: {self.search!r} is not one of random, grid, {', '.join(SEARCHERS)}")
        if self.search in SEARCHERS:
            if importlib.util.find_spec(SEARCHERS[self.search]) is None:
                raise ValueError(f"search: {self.search} needs the '{SEARCHERS[self.search]}' package, which is "
                                 "not installed; use random or grid, or install it")
            grids = [k for k, d in domains.items() if d.is_grid]
            if grids:
                raise ValueError(f"search: {self.search} cannot enumerate grid keys {grids}; use choice")
        if self.scheduler.kind == "pbt":
            if not self.checkpoint.stage:
                raise ValueError("scheduler.kind=pbt needs checkpoint.stage: the stage whose checkpoints "
                                 "exploited trials restart from")
            unknown = [k for k in self.scheduler.mutate if k not in domains]
            if unknown:
                raise ValueError(f"scheduler.mutate: {unknown} are not keys of space")
        if self.checkpoint.stage and self.checkpoint.stage not in self.stages:
            raise ValueError(f"checkpoint.stage: '{self.checkpoint.stage}' is not one of the trial's stages "
                             f"({', '.join(self.stages)})")

    def domains(self) -> dict[str, space_lib.Domain]:
        try:
            return space_lib.parse_space(self.space)
        except config_lib.ConfigError as exc:
            raise ValueError(str(exc)) from exc


def build_scheduler(cfg: TuneConfig, domains: dict[str, space_lib.Domain]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = cfg.scheduler
    if s.kind == "asha":
        # stop_last_trials=False: a trial that reaches max_t ends by itself and reports its summary
        return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, stop_last_trials=False)
    if s.kind == "pbt":
        keys = s.mutate or [k for k, d in domains.items() if not d.is_grid]
        mutations = {k: list(domains[k].args) if domains[k].kind in ("choice", "grid") else domains[k].to_tune()
                     for k in keys}
        return PopulationBasedTraining(time_attr=s.time_attr, perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations, quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability, synch=False)
    return FIFOScheduler()


def build_searcher(cfg: TuneConfig):
    from ray.tune.search import create_searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.search in ("random", "grid"):
        # built here (seeded), so max_concurrent_trials must be given to it: Tune only applies it
        # to the basic generator it builds itself
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials or 0)
    return create_searcher(cfg.search)


def experiment_path(work: Path | str) -> Path | str:
    return runs.at(_absolute(work), RAY_RESULTS, EXPERIMENT)


def _absolute(location: Path | str) -> Path | str:
    return location if storage.is_remote(location) else Path(location).resolve()


def lease_actor(work: Path | str) -> str:
    """The name of the lease actor of the sweep in ``work`` (:mod:`llmray.tune.leases`)."""
    return leases.actor_name(str(_absolute(work)))


def sweep_key(cfg: TuneConfig) -> str:
    """The config hash of the sweep itself: how a sweep is continued (``resume``) is not part of it."""
    return config_lib.config_hash(dataclasses.replace(cfg, resume="auto"))


def _record_path(work: Path | str) -> Path | str:
    return runs.at(_absolute(work), RAY_RESULTS, EXPERIMENT + ".json")


def record_sweep(work: Path | str, key: str, finished: bool) -> None:
    runs.write_json(_record_path(work), {"config_sha256": key, "finished": finished})


def plan_start(resume: bool | str, work: Path | str, key: str, restorable: bool) -> Literal["restore", "fresh"]:
    """Restore the sweep in ``work`` or start a new one; raise rather than delete an interrupted one.

    ``restorable`` is ``Tuner.can_restore`` of the experiment folder. A restorable sweep that its
    record does not mark finished is *interrupted*: ``auto``/``true`` restore it when it was started
    from this config (``key``), and refuse otherwise, since restoring keeps the old space and
    trials under the new config's lineage; ``false`` refuses. A finished sweep (its results are in
    the output) or an unrestorable folder gives way to a new sweep, except under ``true``.
    """
    path, record_file = experiment_path(work), _record_path(work)
    record = json.loads(storage.read_text(record_file)) if storage.is_file(record_file) else {}
    if not restorable or record.get("finished"):
        if resume is True:
            raise FileNotFoundError(f"resume=true, but {path} holds no interrupted sweep to continue; "
                                    "resume=auto starts a new sweep when there is none")
        return "fresh"
    to_delete = f"delete {path} and {runs.at(work, trial_lib.TRIALS)} to start over"
    if resume is False:
        raise FileExistsError(f"{path} holds an interrupted sweep, which resume=false does not delete: "
                              f"pass resume=auto to continue it, or {to_delete}")
    if record.get("config_sha256") != key:
        raise FileExistsError(f"{path} holds an unfinished sweep started from another config (or by an "
                              f"older llmray); continue it with its own config, or {to_delete}")
    return "restore"


def build_tuner(cfg: TuneConfig, work: Path | str, run_root: Path | str, ray_cfg):
    """The interrupted :class:`ray.tune.Tuner` restored, or a new one (see :func:`plan_start`)."""
    from ray import tune

    work = _absolute(work)
    # A trial reports each stage's metrics as they come; the sweep metric may appear only in a
    # later stage (eval), so Tune's check that the first result already holds it must be off.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    domains = cfg.domains()
    plan = trial_lib.TrialPlan(stages=cfg.stages, work=work, run_root=_absolute(run_root),
                               run_dir_text=str(run_root), leases=lease_actor(work),
                               cwd=Path.cwd().resolve(), ray=ray_cfg,
                               checkpoint_stage=cfg.checkpoint.stage, checkpoint_subdir=cfg.checkpoint.subdir,
                               restore_key=cfg.checkpoint.restore_key)
    trainable = tune.with_resources(tune.with_parameters(trial_lib.run_trial, plan=plan),
                                    {"CPU": cfg.resources.cpu, "GPU": cfg.resources.gpu})
    param_space = {key: domain.to_tune(enumerate_choices=cfg.search == "grid") for key, domain in domains.items()}
    path = experiment_path(work)
    key = sweep_key(cfg)
    if plan_start(cfg.resume, work, key, tune.Tuner.can_restore(str(path))) == "restore":
        log.info("resuming the sweep in %s: finished trials are kept", path)
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, param_space=param_space)
    if storage.exists(path):
        log.info("starting a new sweep in place of the finished (or unrestorable) one in %s", path)
    storage.delete(path)
    storage.delete(runs.at(work, trial_lib.TRIALS))
    record_sweep(work, key, finished=False)
    tune_config = tune.TuneConfig(
        metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, search_alg=build_searcher(cfg),
        scheduler=build_scheduler(cfg, domains), max_concurrent_trials=cfg.max_concurrent_trials,
        time_budget_s=cfg.time_budget_s, reuse_actors=False,
        trial_dirname_creator=lambda t: t.trial_id)
    run_config = tune.RunConfig(
        name=EXPERIMENT, storage_path=str(runs.at(work, RAY_RESULTS)),
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def run_tune(cfg: TuneConfig, ctx) -> dict:
    from llmray.tune import results as results_lib

    ctx.connect_ray()
    tuner = build_tuner(cfg, ctx.dir.work, ctx.run_root, ctx.ray)
    with leases.serving(lease_actor(ctx.dir.work)):
        grid = tuner.fit()
    record_sweep(ctx.dir.work, sweep_key(cfg), finished=True)
    summary, rows = results_lib.write_results(grid, cfg, ctx.dir.work, ctx.output, storage.name(ctx.run_root))
    for row in rows:
        ctx.log_metrics(trial=row["trial_id"], status=row["status"], steps=row["steps"],
                        **({cfg.metric: row["metric"]} if row["metric"] is not None else {}))
    ctx.logger.info("sweep done: %s", {k: summary[k] for k in ("trials", "completed", "stopped", "error")})
    return summary

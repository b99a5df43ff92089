"""The stage registry and the one function that runs a stage inside its run directory.

A stage is ``run_<stage>(cfg, ctx) -> summary``: ``cfg`` is the stage's own config dataclass,
``ctx`` a :class:`StageContext` giving it a fresh output directory, a persistent work directory,
a metrics log and a logger. Everything around that is here, once, for every stage:

* the resolved config is written to ``runs/<name>/<stage>/config.yaml``;
* inputs (``cfg.inputs()``) are fingerprinted; if the manifest of a complete earlier run has the
  same config hash and input fingerprints, the stage is skipped and says so (lineage cache);
* the output directory is built under a temporary name and swapped in only on success;
* the manifest records inputs and outputs with sha256, timings and the stage's summary;
* with ``tracking`` on, the stage's config and ``metrics.jsonl`` become an MLflow run when it ends
  (:mod:`llmray.tracking`), failed or not; the manifest records the MLflow run id.

Registering a stage is one entry in :data:`STAGES`; modules are imported lazily so that
``llmray --help`` does not import torch or Ray.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from llmray import cluster, dashboard_metrics
from llmray import config as config_lib
from llmray import runs, storage
from llmray.tracking import TrackingConfig

RUN_DIR_PLACEHOLDER = "{run_dir}"
log = logging.getLogger("llmray")


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    config_ref: str  # "module:ConfigClass"
    run_ref: str  # "module:function"
    verb: str | None = None  # CLI spelling `llmray <name> <verb>` (e.g. `llmray tokenizer train`)

    @property
    def config_cls(self) -> type:
        return resolve(self.config_ref)

    @property
    def run_fn(self) -> Callable[[Any, "StageContext"], dict]:
        return resolve(self.run_ref)


def resolve(ref: str) -> Any:
    """Import ``"module:attr"`` lazily."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


# One entry per stage, in pipeline order.
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("classifier", "train fastText quality/toxicity classifiers from labelled data (held-out P/R/F1)",
          "llmray.data.filters.classifiers:ClassifierConfig", "llmray.data.filters.classifiers:run_classifier", verb="train"),
    Stage("curate", "curate raw sources into documents on Ray Data: normalize, filter, LID/quality/toxicity, PII",
          "llmray.data.curate:CurateConfig", "llmray.data.curate:run_curate"),
    Stage("tokenizer", "train a byte-level BPE tokenizer (and its chat template) on the documents",
          "llmray.tokenizer.train:TokenizerConfig", "llmray.tokenizer.train:run_tokenizer", verb="train"),
    Stage("tokens", "tokenize the documents on Ray Data into train/val token shards",
          "llmray.tokens.tokenize:TokensConfig", "llmray.tokens.tokenize:run_tokens"),
    Stage("pretrain", "pretrain the model on token shards (Ray Train or in process; FSDP2/ZeRO, TP, PP), resumable",
          "llmray.train.pretrain:PretrainConfig", "llmray.train.pretrain:run_pretrain"),
    Stage("proxy", "pretrain a small proxy model in this process (the unit of sweeps and data ablations)",
          "llmray.train.pretrain:ProxyConfig", "llmray.train.pretrain:run_pretrain", verb="train"),
    Stage("sft", "instruction-tune a model on chat data (assistant-only loss, best-fit packing) on the shared Trainer",
          "llmray.align.sft:SftConfig", "llmray.align.sft:run_sft"),
    Stage("dpo", "align a model to preference pairs with DPO (reference log-probs cached, Ray actor pool)",
          "llmray.align.dpo:DpoConfig", "llmray.align.dpo:run_dpo"),
    Stage("reward", "train a reward model (scalar head, Bradley-Terry) on preference pairs, for RL from human feedback",
          "llmray.rl.reward_stage:RewardModelConfig", "llmray.rl.reward_stage:run_reward_model", verb="train"),
    Stage("rl", "reinforcement learning with GRPO on verifiable rewards: rollout actors feeding the shared Trainer",
          "llmray.rl.stage:RlConfig", "llmray.rl.stage:run_rl"),
    Stage("eval", "score checkpoints on benchmark tasks (acc, acc_norm, bits/byte, CORE) on a Ray actor pool",
          "llmray.eval.stage:EvalConfig", "llmray.eval.stage:run_eval"),
    Stage("tune", "sweep any config keys of any stages with Ray Tune (ASHA/PBT), incl. data ablations",
          "llmray.tune.sweep:TuneConfig", "llmray.tune.sweep:run_tune"),
)}


@dataclass
class StageContext:
    """What a running stage may touch."""

    stage: str
    run_name: str
    run_root: Path | str  # runs/<name>: a local Path, or a URI (str) on an object store
    dir: runs.StageDir
    output: Path | str  # the output folder being built; becomes dir.output on success
    logger: logging.Logger
    ray: cluster.RayConfig

    def log_metrics(self, **metrics: Any) -> None:
        """Append to metrics.jsonl and publish the values live to the Ray dashboard."""
        self.dir.log_metrics(**metrics)
        dashboard_metrics.publish(self.run_name, self.stage, metrics)

    def connect_ray(self) -> cluster.Connection:
        """Connect to Ray (only stages that use it call this, so skipped stages start nothing)."""
        connection = cluster.connect(self.ray)
        self.logger.info(cluster.describe(connection))
        return connection


@dataclass
class StageResult:
    stage: str
    skipped: bool
    output: Path | str
    manifest: dict
    reason: str = ""


def substitute_run_dir(data: Any, run_root: Path) -> Any:
    """Replace ``{run_dir}`` in every string of raw config data with the run's root directory.

    This is how a stage's config points at an earlier stage's output in the same run, e.g.
    ``documents: "{run_dir}/curate/output/documents"``.
    """
    if isinstance(data, str):
        return data.replace(RUN_DIR_PLACEHOLDER, str(run_root))
    if isinstance(data, dict):
        return {k: substitute_run_dir(v, run_root) for k, v in data.items()}
    if isinstance(data, list):
        return [substitute_run_dir(v, run_root) for v in data]
    return data


def build_config(stage: Stage, raw: dict, run_root: Path) -> Any:
    """Validate ``raw`` into the stage's config, with ``{run_dir}`` resolved everywhere.

    Defaults are resolved too (e.g. a default input of ``{run_dir}/curate/output/documents``), so
    the config is typed once with the user's values, then again after substitution.
    """
    typed = config_lib.from_dict(stage.config_cls, raw)
    return config_lib.from_dict(stage.config_cls, substitute_run_dir(config_lib.to_dict(typed), run_root))


@contextlib.contextmanager
def _stage_log(stage_dir: runs.StageDir) -> Iterator[logging.Logger]:
    """The stage's logger; while it runs, every ``llmray.*`` log record also goes to stage.log.

    On an object store the log is written to a local temp file and uploaded when the stage ends,
    failed or not (objects cannot be appended to)."""
    local_log = stage_dir.log_file
    if stage_dir.remote:
        handle, name = tempfile.mkstemp(prefix="llmray-stage-", suffix=".log")
        os.close(handle)
        local_log = Path(name)
    else:
        stage_dir.root.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(local_log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("llmray")
    package_logger.addHandler(handler)
    if package_logger.getEffectiveLevel() > logging.INFO:  # used as a library without logging set up
        package_logger.setLevel(logging.INFO)
    try:
        yield logging.getLogger(f"llmray.stage.{stage_dir.stage}")
    finally:
        package_logger.removeHandler(handler)
        handler.close()
        if stage_dir.remote:
            storage.write_bytes(stage_dir.log_file, local_log.read_bytes())
            local_log.unlink()


def run_stage(stage: Stage, cfg: Any, run_root: Path | str, ray_cfg: cluster.RayConfig | None = None,
              force: bool = False, tracking: TrackingConfig | None = None) -> StageResult:
    """Run one stage (or skip it when its lineage is unchanged) and return what it produced."""
    run_root = runs.at(run_root)
    stage_dir = runs.StageDir(runs.at(run_root, stage.name), stage.name)
    config_sha = config_lib.config_hash(cfg)
    inputs = runs.fingerprint_inputs(cfg.inputs() if hasattr(cfg, "inputs") else {})
    previous = stage_dir.read_manifest()
    hit, reason = (False, "--force") if force else runs.cache_hit(previous, config_sha, inputs, stage_dir.output)
    if hit:
        log.info("[%s] skipped: %s; outputs in %s", stage.name, reason, stage_dir.output)
        return StageResult(stage.name, True, stage_dir.output, previous, reason)
    log.info("[%s] running: %s", stage.name, reason)

    storage.write_text(stage_dir.at("config.yaml"), config_lib.dump_yaml(cfg))
    started = time.time()
    manifest = {"stage": stage.name, "status": "running", "config_sha256": config_sha,
                "inputs": inputs, "started_at": _iso(started), "ran_because": reason}
    stage_dir.write_manifest(manifest)
    with _stage_log(stage_dir) as logger:
        try:
            with runs.replace_dir(stage_dir.output) as partial:
                ctx = StageContext(stage.name, storage.name(run_root), run_root, stage_dir, partial, logger,
                                   ray_cfg or cluster.RayConfig())
                logger.info("running stage %s in %s", stage.name, stage_dir.root)
                summary = stage.run_fn(cfg, ctx) or {}
        except BaseException as exc:
            manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished_at=_iso(time.time()))
            _track(tracking, manifest, cfg, run_root, stage_dir, failed=True)
            stage_dir.write_manifest(manifest)
            raise
    finished = time.time()
    manifest.update(status="complete", outputs=runs.fingerprint_outputs(stage_dir.output),
                    summary=summary, finished_at=_iso(finished), seconds=round(finished - started, 3),
                    resources=cluster.resources_in_use())
    _track(tracking, manifest, cfg, run_root, stage_dir, failed=False)
    stage_dir.write_manifest(manifest)
    log.info("[%s] done in %.1fs; outputs in %s", stage.name, finished - started, stage_dir.output)
    return StageResult(stage.name, False, stage_dir.output, manifest, reason)


def _track(tracking: TrackingConfig | None, manifest: dict, cfg: Any, run_root: Path | str, stage_dir: runs.StageDir,
           failed: bool) -> None:
    """Record the stage in MLflow (``manifest["mlflow"]``); a tracking server that fails is logged, not
    raised: the stage's own outputs are complete and the run directory holds the same record."""
    if tracking is None or not tracking.enabled:
        return
    from llmray import tracking as tracking_lib

    metrics, _ = stage_dir.read_metrics()
    try:
        manifest["mlflow"] = tracking_lib.log_stage(
            tracking, run=storage.name(run_root), stage=stage_dir.stage, config=config_lib.to_dict(cfg), metrics=metrics,
            tags={"llmray.config_sha256": manifest["config_sha256"], "llmray.stage_dir": str(stage_dir.root)},
            failed=failed)
    except Exception as exc:  # noqa: BLE001 - reported in the log and the manifest
        log.error("[%s] MLflow tracking at %s failed: %s: %s", stage_dir.stage, tracking.mlflow_uri,
                  type(exc).__name__, exc)
        manifest["mlflow"] = {"uri": tracking.mlflow_uri, "error": f"{type(exc).__name__}: {exc}"}


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))

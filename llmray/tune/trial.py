"""One trial of a sweep: its stages, run with unchanged upstream stages shared between trials.

Design choices:

* A trial is the sweep's base stage configs with the trial's sampled values set at their dotted
  keys (:func:`llmray.tune.space.with_values`), run in order through
  :func:`llmray.stages.run_stage`, exactly as ``llmray pipeline`` would run them.
* **Lineage keys**: each stage's key is the hash of its raw config (``{run_dir}`` unexpanded)
  chained with the previous stage's key; the stage runs in ``work/stages/<stage>-<key>/`` (a
  *slot*), and the paths of its config that name an earlier stage under ``{run_dir}`` are
  pointed at *that* stage's slot (or at the sweep run's own stage, for stages the trial does not
  run). Trials with the same upstream settings meet in the same slot and ``run_stage``'s lineage
  cache skips the repeat (conservative: anything upstream changing reruns the stage). A lease
  per slot (:mod:`llmray.tune.leases`) makes concurrent trials, on any node, wait instead of
  computing a stage twice. ``work/trials/<trial_id>/`` records which stages a trial ran and
  which it reused.
* **Storage**: slots, trial records and the Tune experiment are locations
  (:mod:`llmray.storage`), so a sweep's run directory may be on an object store like any other
  stage's.
* **Metrics**: while a stage runs in a helper thread, the trial tails its ``metrics.jsonl`` and
  reports each record to Tune (ASHA/PBT see per-step results without the stage knowing Tune);
  a new complete checkpoint of the checkpoint stage goes with the next report, so a PBT exploit
  can hand it to another trial. The last report adds every stage's summary and
  ``trial_completed: 1``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmray import cluster, runs, storage
from llmray import config as config_lib
from llmray import stages as stages_lib
from llmray.tune import leases
from llmray.tune import space as space_lib

log = logging.getLogger("llmray.tune")
STAGE_CACHE = "stages"
TRIALS = "trials"
TRIAL_RECORD = "trial.json"
COMPLETED = "trial_completed"
_POLL_S = 0.25


@dataclass
class TrialPlan:
    """Everything a trial needs, shipped to the trial's process once per sweep."""

    stages: dict[str, dict]  # stage name -> raw config, in run order
    work: Path | str  # the tune stage's work directory (absolute, or a URI)
    run_root: Path | str  # the sweep's run directory: its other stages are visible to trials under {run_dir}
    cwd: Path  # the driver's working directory: relative paths in configs are relative to it
    run_dir_text: str = ""  # what {run_dir} became in the sweep config: rebased onto each stage's own root
    leases: str = ""  # name of the sweep's lease actor (llmray.tune.leases)
    ray: cluster.RayConfig = field(default_factory=cluster.RayConfig)
    checkpoint_stage: str | None = None  # whose checkpoints go to Tune
    checkpoint_subdir: str = "work/checkpoints"  # where that stage writes step_* checkpoints
    restore_key: str = "resume_from"  # its config key that receives a checkpoint Tune hands back


def lineage_keys(stages: dict[str, dict]) -> list[str]:
    """One key per stage: sha256 of (previous key, stage name, raw config), 16 hex digits."""
    keys, previous = [], ""
    for name, raw in stages.items():
        canonical = json.dumps([previous, name, raw], sort_keys=True, separators=(",", ":"), default=str)
        previous = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        keys.append(previous)
    return keys


@dataclass
class StageSlot:
    """Where one stage of one lineage lives."""

    name: str
    key: str
    root: Path | str  # the run root of this stage: the stage's folder is root/<name>

    @property
    def stage_dir(self) -> Path | str:
        return runs.at(self.root, self.name)


def stage_slots(stages: dict[str, dict], cache: Path | str) -> list[StageSlot]:
    names, keys = list(stages), lineage_keys(stages)
    return [StageSlot(name, key, runs.at(cache, f"{name}-{key}")) for name, key in zip(names, keys)]


def upstream_dirs(slots: list[StageSlot], index: int, run_root: Path | str) -> dict[str, Path | str]:
    """Where stage ``index`` finds each stage it may read: the slots of its earlier stages, and
    the sweep run's own stage folders that the trial does not run (outputs made before the sweep)."""
    found = {earlier.name: earlier.stage_dir for earlier in slots[:index]}
    trial_stages = {s.name for s in slots}
    for name in storage.list_dirs(run_root):
        if name not in trial_stages and name not in ("tune", "report"):
            found.setdefault(name, runs.at(run_root, name))
    return found


def rebase(data: Any, old_root: str, new_root: Path | str) -> Any:
    """Point every string path under ``old_root`` at the same place under ``new_root``."""
    if isinstance(data, str):
        if old_root and (data == old_root or data.startswith(old_root + "/")):
            return str(new_root) + data[len(old_root):]
        return data
    if isinstance(data, dict):
        return {k: rebase(v, old_root, new_root) for k, v in data.items()}
    if isinstance(data, list):
        return [rebase(v, old_root, new_root) for v in data]
    return data


def build_stage_configs(stages: dict[str, dict], slots: list[StageSlot], run_dir_text: str,
                        run_root: Path | str) -> list[tuple[stages_lib.Stage, Any]]:
    """Validate every stage's config before anything runs; errors name the trial's stage and key.

    The sweep's own config loading already replaced ``{run_dir}`` with the sweep's run directory
    (``run_dir_text``); inside a trial, ``{run_dir}`` means the stage's lineage root, so those
    paths are rebased onto it, and from there onto the folder of the stage they name
    (:func:`upstream_dirs`)."""
    typed = []
    for index, slot in enumerate(slots):
        stage = stages_lib.STAGES[slot.name]
        try:
            raw = rebase(stages[slot.name] or {}, run_dir_text, slot.root)
            cfg = stages_lib.build_config(stage, raw, slot.root)
            # a second pass resolves {run_dir} in defaults too (e.g. tokenizer.documents left unset)
            resolved = stages_lib.substitute_run_dir(config_lib.to_dict(cfg), slot.root)
            for name, directory in upstream_dirs(slots, index, run_root).items():
                resolved = rebase(resolved, str(runs.at(slot.root, name)), directory)
            typed.append((stage, config_lib.from_dict(stage.config_cls, resolved)))
        except config_lib.ConfigError as exc:
            raise config_lib.ConfigError(f"in stage {slot.name}: {exc}") from exc
    return typed


# ---------------------------------------------------------------------------------------------
# Running a trial's stages
# ---------------------------------------------------------------------------------------------

class MetricsTail:
    """New complete JSON lines of a metrics.jsonl (a file or an object rewritten whole with lines
    added), from the byte offset where it was opened."""

    def __init__(self, location: Path | str):
        self.location = location
        self.offset = storage.size(location) or 0

    def read(self) -> list[dict]:
        size = storage.size(self.location)  # one lookup per poll (a request, on an object store)
        if size is None or size <= self.offset:
            return []
        with storage.open_input(self.location) as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a line still being written stays for the next read
        self.offset += end
        return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]


@dataclass
class StageRun:
    """What a trial did with one stage."""

    name: str
    key: str
    directory: str
    reused: bool
    seconds: float
    summary: dict


class StageRunner:
    """Runs a trial's stages in order in a helper thread; the caller polls :meth:`new_records`."""

    def __init__(self, typed: list[tuple[stages_lib.Stage, Any]], slots: list[StageSlot], plan: TrialPlan,
                 record: "TrialRecord"):
        self.typed, self.slots, self.plan, self.record = typed, slots, plan, record
        self.runs: list[StageRun] = []
        self.current: tuple[StageSlot, MetricsTail] | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run_all, name="llmray-trial-stages", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run_all(self) -> None:
        try:
            for index, (stage, cfg) in enumerate(self.typed):
                slot = self.slots[index]
                with leases.leased(self.plan.leases, str(slot.root)):
                    with self._lock:
                        self.current = (slot, MetricsTail(runs.at(slot.stage_dir, "metrics.jsonl")))
                    started = time.time()
                    result = stages_lib.run_stage(stage, cfg, slot.root, self.plan.ray)
                self.runs.append(StageRun(slot.name, slot.key, str(slot.stage_dir), result.skipped,
                                          round(time.time() - started, 3), result.manifest.get("summary", {})))
                self.record.save(self.runs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial's thread
            self.error = exc
            self.record.save(self.runs, exc)

    def new_records(self) -> list[tuple[str, dict]]:
        with self._lock:
            current = self.current
        if current is None:
            return []
        slot, tail = current
        return [(slot.name, record) for record in tail.read()]


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` keeping numbers, booleans and strings."""
    flat = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        elif isinstance(value, (int, float, str, bool)):
            flat[path] = value
    return flat


def _report_values(stage: str, record: dict) -> dict:
    values = {k: v for k, v in record.items() if k != "time" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {**values, "stage": stage}


def run_trial(config: dict, plan: TrialPlan) -> None:
    """The Tune function trainable: run the trial's stages, reporting their metrics as they come."""
    from ray import tune

    if plan.cwd.is_dir():
        os.chdir(plan.cwd)  # Tune starts trials in their own directory; configs are relative to the driver's
    trial_id = tune.get_context().get_trial_id()
    stages = dict(plan.stages)
    restored = tune.get_checkpoint()
    values = dict(config)
    if restored is not None and plan.checkpoint_stage:
        values[f"{plan.checkpoint_stage}.{plan.restore_key}"] = _local_copy(restored, plan.work, trial_id)
    stages = space_lib.with_values(stages, values)
    slots = stage_slots(stages, runs.at(plan.work, STAGE_CACHE))
    record = TrialRecord(runs.at(plan.work, TRIALS, trial_id), trial_id, config, slots)
    record.attempt(restored is not None)
    try:
        typed = build_stage_configs(stages, slots, plan.run_dir_text, plan.run_root)  # a bad value fails here, before any work
    except config_lib.ConfigError as exc:
        record.save([], exc)
        raise
    runner = StageRunner(typed, slots, plan, record)
    runner.start()
    latest: dict[str, Any] = {}
    reported_checkpoint: str | None = None
    while True:
        alive = runner.alive()
        for stage, line in runner.new_records():
            reported = _report_values(stage, line)
            latest.update(reported)
            checkpoint = None
            if stage == plan.checkpoint_stage:
                checkpoint, reported_checkpoint = _new_checkpoint(slots, plan, reported_checkpoint)
            _report(tune, reported, checkpoint)
        if not alive:
            break
        runner.join(_POLL_S)
    if runner.error is not None:
        raise runner.error
    final = {**latest, **flatten({run.name: run.summary for run in runner.runs}), COMPLETED: 1}
    final.pop("stage", None)
    _report(tune, final, None)


def _report(tune, values: dict, checkpoint_dir: Path | None) -> None:
    if checkpoint_dir is None:
        tune.report(values)
        return
    try:
        tune.report(values, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
    finally:
        shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)


def _new_checkpoint(slots: list[StageSlot], plan: TrialPlan, reported: str | None) -> tuple[Path | None, str | None]:
    """A private copy of the stage's newest complete checkpoint if it is newer than ``reported``.

    Copied straight into a temp folder, which Tune's report then takes over (a checkpoint on an
    object store is downloaded once, never into the node's cache: a trial reports many)."""
    from llmray.train import checkpoint as ckpt

    slot = next(s for s in slots if s.name == plan.checkpoint_stage)
    root = runs.at(slot.stage_dir, plan.checkpoint_subdir)
    for name in ckpt.step_names(root):  # newest first
        if name == reported:
            break
        copy = Path(tempfile.mkdtemp(prefix="llmray-tune-ckpt-")) / name
        try:
            storage.download(runs.at(root, name), copy)
            complete, _ = ckpt.is_complete(copy)
        except OSError:  # rotated away by the trainer while copying
            complete = False
        if complete:
            return copy, name
        shutil.rmtree(copy.parent, ignore_errors=True)
    return None, reported


def _local_copy(checkpoint, work: Path | str, trial_id: str) -> str:
    """The Tune checkpoint handed to this trial (a PBT exploit, a restore), as a local directory:
    in the trial's record folder, or in this node's cache when that folder is on an object store."""
    base = storage.local_path(work) or (
        storage.cache_root() / "tune" / hashlib.sha256(storage.normalize(work).encode()).hexdigest()[:16])
    target = base / TRIALS / trial_id / "restored" / f"{time.time_ns()}"
    checkpoint.to_directory(str(target))
    return str(target)


class TrialRecord:
    """``trials/<id>/``: ``attempts.jsonl`` (one line per start) and ``trial.json`` (stages ran or
    reused so far with their folders, lineage keys, error)."""

    def __init__(self, directory: Path | str, trial_id: str, config: dict, slots: list[StageSlot]):
        self.directory, self.trial_id, self.config, self.slots = directory, trial_id, config, slots

    def attempt(self, restored: bool) -> None:
        line = json.dumps({"time": time.time(), "config": self.config, "restored_checkpoint": restored},
                          default=str)
        storage.append_text(runs.at(self.directory, "attempts.jsonl"), line + "\n")

    def save(self, done: list[StageRun], error: BaseException | None = None) -> None:
        runs.write_json(runs.at(self.directory, TRIAL_RECORD), {
            "trial_id": self.trial_id, "config": self.config,
            "stages": [run.__dict__ for run in done],
            "lineage": {slot.name: slot.key for slot in self.slots},
            "error": None if error is None else f"{type(error).__name__}: {error}"})

"""Run directories, atomic writes, content fingerprints and the lineage cache.

Layout of one stage of one run::

    runs/<name>/<stage>/
        config.yaml       the resolved config (after includes and overrides)
        manifest.json     lineage: config hash, inputs and outputs with sha256, status, timings
        metrics.jsonl     one JSON object per line, appended as the stage runs
        stage.log         the stage's log
        work/             state a resumable stage keeps between attempts (checkpoints, ...)
        output/           the stage's artifacts; built in output.partial/ and renamed when complete

Why it is shaped like this:

* Every artifact write goes through :func:`atomic_write` / :func:`atomic_dir` (temp + fsync +
  rename), so a killed process never leaves a half-written file at a final path.
* A stage is skipped when its manifest says ``complete``, its config hash equals the new one and
  every input's fingerprint is unchanged (datatrove's dedup stages were bitten by resuming on
  changed inputs; we refuse that by construction).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmray import jsonl, storage
from llmray.storage import fingerprint, fsync_dir, sha256_file

MANIFEST = "manifest.json"
# Atomic writes of any location, kept under the names stages have always called them by.
atomic_write, write_bytes, write_text, write_json = (storage.atomic_write, storage.write_bytes,
                                                     storage.write_text, storage.write_json)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and swap it onto ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(partial, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replace_dir(location: str | Path) -> Iterator[Path | str]:
    """Build a stage's output folder in place of the previous one.

    Local: :func:`atomic_dir` (built aside, swapped in on success). On an object store, where a
    folder cannot be renamed without copying every object, the previous output is deleted and the
    new one written in place; the stage's manifest says ``running`` meanwhile and ``complete``
    only once this block succeeded, so neither the lineage cache nor a later stage trusts a
    half-written output. A failed block leaves no output."""
    if not storage.is_remote(location):
        with atomic_dir(location) as partial:
            yield partial
        return
    storage.delete(location)
    try:
        yield storage.normalize(location)
    except BaseException:
        storage.delete(location)
        raise


@contextlib.contextmanager
def built_locally(location: str | Path, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local folder to build ``location`` in, with libraries that write only local files
    (safetensors, tokenizers). Local: :func:`atomic_dir`. Remote: a temp folder that replaces
    ``location`` when the block succeeds, files named in ``last`` uploaded after the rest."""
    if not storage.is_remote(location):
        with atomic_dir(location) as partial:
            yield partial
        return
    with tempfile.TemporaryDirectory(prefix="llmray-build-") as scratch:
        yield Path(scratch)
        storage.delete(location)
        storage.upload_folder(Path(scratch), location, last=last)


# ---------------------------------------------------------------------------------------------
# Stage directories and manifests
# ---------------------------------------------------------------------------------------------

def at(root: str | Path, *parts: str) -> Path | str:
    """``root/parts...`` of the same kind as ``root``: a local ``Path``, or a URI string."""
    return storage.join(root, *parts) if storage.is_remote(root) else Path(root).joinpath(*parts)


def run_root(runs_dir: str | Path, name: str) -> Path | str:
    """The folder of run ``name``: a local ``Path``, or a URI string on an object store."""
    return at(runs_dir, name)


@dataclass
class StageDir:
    """The folder of one stage of one run, and what a running stage writes into it.

    ``root`` is a local path (kept as a ``Path``) or a URI on an object store (kept as a string;
    see :mod:`llmray.storage`). Objects cannot be appended to, so on an object store a line is
    added to ``metrics.jsonl`` by reading the stored file and writing it back whole (tens of lines
    per stage; the stage and a trainer's rank 0 take turns, never writing at the same time), and
    the stage's log is uploaded when the stage ends (:func:`llmray.stages.run_stage`).
    """

    root: Path | str
    stage: str
    remote: bool = field(init=False)

    def __post_init__(self) -> None:
        self.remote = storage.is_remote(self.root)
        self.root = storage.normalize(self.root) if self.remote else Path(self.root)

    def at(self, *parts: str) -> Path | str:
        """A location inside the stage folder, of the same kind as ``root``."""
        return at(self.root, *parts)

    @property
    def output(self) -> Path | str:
        return self.at("output")

    @property
    def work(self) -> Path | str:
        path = self.at("work")
        storage.make_dirs(path)
        return path

    @property
    def log_file(self) -> Path | str:
        return self.at("stage.log")

    @property
    def manifest_path(self) -> Path | str:
        return self.at(MANIFEST)

    @property
    def metrics_file(self) -> Path | str:
        return self.at("metrics.jsonl")

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.manifest_path))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, manifest: dict) -> None:
        storage.write_json(self.manifest_path, manifest)

    def log_metrics(self, **metrics: Any) -> None:
        """Append one JSON line; a line is written with one ``write`` call so readers never see half."""
        storage.append_text(self.metrics_file, json.dumps({"time": time.time(), **metrics}, default=float) + "\n")

    def read_metrics(self) -> tuple[list[dict], list[jsonl.BadLine]]:
        """The records of ``metrics.jsonl`` and, apart, its lines that are not records.

        Bad lines are returned, not raised: several processes append to this file (the stage,
        trainer rank 0) and one killed mid-write leaves a torn line, which must not cost the rest
        of the file; the caller says how many it skipped.
        """
        if not storage.exists(self.metrics_file):
            return [], []
        records, bad = [], []
        for line in jsonl.read_lines(self.metrics_file):
            (bad if isinstance(line.record, jsonl.BadLine) else records).append(line.record)
        return records, bad


def fingerprint_inputs(inputs: dict[str, str | Path]) -> dict[str, dict]:
    """Map each named input to its path and content fingerprint."""
    return {name: {"path": str(path), "sha256": fingerprint(path)} for name, path in sorted(inputs.items())}


def fingerprint_outputs(output_dir: Path | str) -> dict[str, dict]:
    """Every file under a finished output folder with its size, and its sha256 where the folder is
    local (on an object store hashing would pull every byte back through this process; the
    size is what :func:`cache_hit` checks)."""
    remote = storage.is_remote(output_dir)
    return {rel: {"bytes": size} if remote else {"bytes": size, "sha256": sha256_file(storage.join(output_dir, rel))}
            for rel, size in storage.list_files(output_dir)}


def cache_hit(manifest: dict | None, config_sha: str, inputs: dict[str, dict], output_dir: Path | str
              ) -> tuple[bool, str]:
    """(whether the stage can be skipped, why): printed either way, so a re-run is never a mystery.

    Skips only when the previous run completed with the same config hash and input fingerprints
    and all its recorded outputs are still present with the recorded sizes.
    """
    if not manifest:
        return False, "no previous run"
    if manifest.get("status") != "complete":
        return False, f"the previous run did not complete (status {manifest.get('status')!r})"
    if manifest.get("config_sha256") != config_sha:
        return False, f"config changed (sha256 {str(manifest.get('config_sha256'))[:12]} -> {config_sha[:12]})"
    before = manifest.get("inputs") or {}
    changed = sorted(k for k in before.keys() | inputs.keys() if before.get(k) != inputs.get(k))
    if changed:
        return False, f"inputs changed: {', '.join(changed[:5])}" + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    present = dict(storage.list_files(output_dir))
    for rel, info in manifest.get("outputs", {}).items():
        if present.get(rel) != info["bytes"]:
            return False, f"output {rel} is missing or changed"
    return True, (f"inputs and config unchanged since {manifest.get('finished_at', 'the last run')} "
                  f"(config sha256 {config_sha[:12]})")

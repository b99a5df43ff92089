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
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmray import jsonl

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file beside ``path``; on clean exit fsync it and rename it onto ``path``.

    On an exception (or a kill) the final path is untouched and the temp file is removed
    (or, after a kill, left as an ignorable ``.<name>.tmp-*`` file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of a directory tree (relative paths + file hashes, sorted).

    Hidden temp files (``.name.tmp-*``) are ignored so an interrupted writer does not change
    the fingerprint of what it writes into.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or directory")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and ".tmp-" not in p.name):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Stage directories and manifests
# ---------------------------------------------------------------------------------------------

@dataclass
class StageDir:
    """The directory of one stage of one run, and what a running stage writes into it."""

    root: Path
    stage: str
    _metrics_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._metrics_file = self.root / "metrics.jsonl"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def work(self) -> Path:
        path = self.root / "work"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def log_file(self) -> Path:
        return self.root / "stage.log"

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, manifest: dict) -> None:
        write_json(self.manifest_path, manifest)

    def log_metrics(self, **metrics: Any) -> None:
        """Append one JSON line; a line is written with one ``write`` call so readers never see half."""
        record = {"time": time.time(), **metrics}
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._metrics_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")

    def read_metrics(self) -> tuple[list[dict], list[jsonl.BadLine]]:
        """The records of ``metrics.jsonl`` and, apart, its lines that are not records.

        Bad lines are returned, not raised: several processes append to this file (the stage,
        trainer rank 0) and one killed mid-write leaves a torn line, which must not cost the rest
        of the file; the caller says how many it skipped.
        """
        if not self._metrics_file.exists():
            return [], []
        records, bad = [], []
        for line in jsonl.read_lines(self._metrics_file):
            (bad if isinstance(line.record, jsonl.BadLine) else records).append(line.record)
        return records, bad


def fingerprint_inputs(inputs: dict[str, str | Path]) -> dict[str, dict]:
    """Map each named input to its path and content fingerprint."""
    return {name: {"path": str(path), "sha256": fingerprint(path)} for name, path in sorted(inputs.items())}


def fingerprint_outputs(output_dir: Path) -> dict[str, dict]:
    """Every file under a finished output directory with its size and sha256."""
    return {str(p.relative_to(output_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(output_dir.rglob("*")) if p.is_file()}


def cache_hit(manifest: dict | None, config_sha: str, inputs: dict[str, dict], output_dir: Path) -> tuple[bool, str]:
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
    for rel, info in manifest.get("outputs", {}).items():
        target = output_dir / rel
        if not target.is_file() or target.stat().st_size != info["bytes"]:
            return False, f"output {rel} is missing or changed"
    return True, (f"inputs and config unchanged since {manifest.get('finished_at', 'the last run')} "
                  f"(config sha256 {config_sha[:12]})")

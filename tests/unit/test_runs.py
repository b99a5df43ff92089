"""Atomic writes and fingerprints: a killed writer never leaves a partial file at the final path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from llmray import runs


def _killed_writer(target, payload_mb: int) -> subprocess.CompletedProcess:
    """Run a process that writes through atomic_write and is SIGKILLed mid-write."""
    code = textwrap.dedent(f"""
        import os, signal
        from llmray.runs import atomic_write
        with atomic_write({str(target)!r}, "wb") as handle:
            handle.write(b"x" * ({payload_mb} << 20))
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True)


def test_killed_write_leaves_no_file_at_final_path(tmp_path):
    target = tmp_path / "shard.bin"
    proc = _killed_writer(target, 4)
    assert proc.returncode == -9
    assert not target.exists()
    assert runs.fingerprint(tmp_path) == runs.fingerprint(tmp_path)  # leftover temp is ignored


def test_killed_overwrite_keeps_previous_complete_file(tmp_path):
    target = tmp_path / "manifest.json"
    runs.write_json(target, {"version": 1})
    proc = _killed_writer(target, 1)
    assert proc.returncode == -9
    assert target.read_text().strip().startswith("{") and '"version": 1' in target.read_text()


def test_exception_inside_write_removes_temp_and_keeps_old(tmp_path):
    target = tmp_path / "a.txt"
    runs.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with runs.atomic_write(target) as handle:
            handle.write("new, half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_swaps_only_on_success(tmp_path):
    out = tmp_path / "output"
    with runs.atomic_dir(out) as partial:
        (partial / "f").write_text("1")
    with pytest.raises(ValueError):
        with runs.atomic_dir(out) as partial:
            (partial / "f").write_text("2")
            raise ValueError("stage failed")
    assert (out / "f").read_text() == "1"


def test_fingerprint_tracks_content_and_names(tmp_path):
    (tmp_path / "a").write_text("x")
    first = runs.fingerprint(tmp_path)
    (tmp_path / "a").write_text("y")
    second = runs.fingerprint(tmp_path)
    (tmp_path / "a").rename(tmp_path / "b")
    assert len({first, second, runs.fingerprint(tmp_path)}) == 3
    with pytest.raises(FileNotFoundError, match="cannot fingerprint"):
        runs.fingerprint(tmp_path / "missing")


def test_metrics_lines_append_and_read_back(tmp_path):
    stage_dir = runs.StageDir(tmp_path / "s", "s")
    stage_dir.log_metrics(step=1, loss=2.5)
    stage_dir.log_metrics(step=2, loss=2.0)
    records, bad = stage_dir.read_metrics()
    assert [(m["step"], m["loss"]) for m in records] == [(1, 2.5), (2, 2.0)] and bad == []

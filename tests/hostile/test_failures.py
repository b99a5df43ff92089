"""Bugs fail loudly, dirty data does not: a programming error inside a step fails the stage with
its traceback instead of becoming quarantine rows, and a source whose records are mostly
unreadable fails the stage naming the source instead of finishing with an empty corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from llmray import cluster, config as config_lib, stages
from llmray.data import curate, records
from llmray.data.filters import heuristics
from llmray.data.readers import errors, sources
from tests.hostile.child import REPO_ROOT
from tests.hostile.conftest import jsonl_bytes

# Loaded by every Python process started with this folder on PYTHONPATH, Ray's workers included.
BREAK_READER = '''
from llmray.data.readers import sources

def _broken(path, source, unit, limits):
    raise TypeError("injected bug: a reader called with the wrong type")

sources._RECORD_READERS["jsonl"] = _broken
'''


def test_a_type_error_in_a_reader_propagates_instead_of_becoming_quarantine(c4_records, tmp_path, monkeypatch):
    (tmp_path / "web.jsonl").write_bytes(jsonl_bytes(c4_records[:3]))
    source = sources.SourceConfig(name="web", kind="jsonl", paths=[str(tmp_path)])

    def broken(*args):
        yield sources.RawRecord(0, "fine")
        raise TypeError("injected bug")

    monkeypatch.setitem(sources._RECORD_READERS, "jsonl", broken)
    (unit,) = sources.plan([source])
    with pytest.raises(TypeError, match="injected bug"):
        list(sources.read_unit(unit, source, sources.ReadLimits()))


def test_a_type_error_in_a_filter_propagates(monkeypatch):
    row = records.document_row("web", "web.jsonl", 0, "Some real looking text. " * 20, domain="text")

    def broken(*args):
        raise TypeError("injected bug in a filter")

    monkeypatch.setattr(heuristics, "apply_filters", broken)
    with pytest.raises(TypeError, match="injected bug in a filter"):
        curate.clean_step(records.to_table([row]), heuristics.FilterConfig(), {})


def test_the_curate_stage_fails_with_the_traceback_of_a_bug_in_a_ray_worker(c4_records, tmp_path):
    (tmp_path / "web.jsonl").write_bytes(jsonl_bytes(c4_records[:5]))
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(BREAK_READER)
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"name": "web", "kind": "jsonl", "paths": [str(tmp_path)]}],
                                      "classify": {"lid": {"enabled": False}}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), str(REPO_ROOT)]),
           "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", "import sys; from llmray.cli import main; sys.exit(main())",
                           "curate", "--config", str(config),
                           "--runs-dir", str(tmp_path / "runs"), "--num-cpus", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "Traceback" in output and "TypeError: injected bug: a reader called with the wrong type" in output
    assert not (tmp_path / "runs" / "curate" / "curate" / "output" / "documents").exists()


def test_a_source_with_80_percent_malformed_records_fails_the_stage_naming_it(c4_records, ray_session, tmp_path):
    lines = jsonl_bytes(c4_records[:10]).splitlines(keepends=True)
    mostly_bad = b"".join(line if i % 5 == 0 else line[: len(line) // 2] + b"\n" for i, line in enumerate(lines))
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    (tmp_path / "bad" / "dump.jsonl").write_bytes(mostly_bad)
    (tmp_path / "good" / "web.jsonl").write_bytes(jsonl_bytes(c4_records[10:20]))
    raw = {"sources": [{"name": "clean", "kind": "jsonl", "paths": [str(tmp_path / "good")]},
                       {"name": "broken_dump", "kind": "jsonl", "paths": [str(tmp_path / "bad")]}],
           "classify": {"lid": {"enabled": False}}}
    cfg = config_lib.from_dict(curate.CurateConfig, raw)
    with pytest.raises(errors.QuarantineExceeded) as failed:
        stages.run_stage(stages.STAGES["curate"], cfg, tmp_path / "run", cluster.RayConfig(), force=True)
    message = str(failed.value)
    assert "source 'broken_dump': 80% of 10 records quarantined" in message and "'clean'" not in message
    assert f"{tmp_path / 'bad' / 'dump.jsonl'}:2: not valid JSON" in message
    assert not (tmp_path / "run" / "curate" / "output" / "documents").exists()
    cfg.limits.max_quarantine_fraction = 0.9  # the user's call when the data really is that dirty
    result = stages.run_stage(stages.STAGES["curate"], cfg, tmp_path / "run", cluster.RayConfig(), force=True)
    funnel = json.loads((result.output / "funnel.json").read_text())
    assert funnel["totals"]["quarantined"] == 8 and funnel["totals"]["documents_in"] == 20
    kept = pq.read_table(result.output / "documents").column("meta").to_pylist()
    readable = {f"c4-{i}" for i in [0, 5, *range(10, 20)]}
    assert kept and {json.loads(m)["source_id"] for m in kept} <= readable

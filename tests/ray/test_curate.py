"""The curate stage on the shared local Ray: every source kind, injected faults, determinism, restart.

The corpus is small slices of ../shared/data plus generated fault fixtures: a malformed JSON line,
a JSON line of invalid UTF-8, a truncated .jsonl.gz, a binary file, an empty document, a 50 MB
document, and a WARC with one corrupted record.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmray import cluster, config as config_lib, runs, stages
from llmray.data.readers import html

pytestmark = pytest.mark.ray
REPO_ROOT = Path(__file__).resolve().parents[2]


def c4_lines(shared_data: Path, n: int) -> list[bytes]:
    with open(shared_data / "c4_sample" / "c4_demo.jsonl", "rb") as handle:
        return [next(handle).rstrip(b"\n") for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> dict:
    """Fixture files and the raw config exercising every source kind."""
    root = tmp_path_factory.mktemp("corpus")
    lines = c4_lines(shared_data, 30)
    faults = root / "jsonl"
    faults.mkdir()
    (faults / "good_and_bad.jsonl").write_bytes(b"\n".join(
        lines[:10] + [b'{"text": "never closed', b'{"text": "\xff\xfe\xfd\xfc"}'] + lines[10:20]) + b"\n")
    whole = gzip.compress(b"\n".join(lines[20:30] * 40) + b"\n")
    (faults / "truncated.jsonl.gz").write_bytes(whole[: len(whole) * 3 // 4])
    texts = root / "text"
    texts.mkdir()
    (texts / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (texts / "empty.txt").write_bytes(b"  \n\t\n")
    (texts / "huge.txt").write_bytes(b"All work and no play makes a dull document. " * (50 * 1024 * 1024 // 45))
    (texts / "speech.txt").write_bytes(json.loads(lines[0])["text"].encode())
    table = pa.table({"content": [json.loads(line)["text"] for line in c4_lines(shared_data, 40)[30:40]]})
    pq.write_table(table, root / "slice.parquet")
    warc = shared_data / "web_cc_warc" / "resiliparse_warcfile.warc.gz"
    records = list(html.iter_warc(warc, "warc", "resiliparse", 10 << 20))
    data = warc.read_bytes()
    victim = records[3].offset
    (root / "broken.warc.gz").write_bytes(data[:victim + 30] + b"\x00" * 64 + data[victim + 94:])
    pages = root / "html"
    pages.mkdir()
    (pages / "whirlwind.html").write_bytes(_first_html(shared_data / "web_cc_warc" / "whirlwind.warc.gz"))
    raw = {
        "sources": [
            {"name": "faults", "kind": "jsonl", "paths": [str(faults)]},
            {"name": "texts", "kind": "text", "paths": [str(texts)]},
            {"name": "parquet", "kind": "parquet", "paths": [str(root / "slice.parquet")], "text_field": "content"},
            {"name": "html", "kind": "html", "paths": [str(pages)]},
            {"name": "warc", "kind": "warc", "paths": [str(root / "broken.warc.gz")]},
            {"name": "wet", "kind": "wet", "paths": [str(shared_data / "web_cc_warc" / "whirlwind.warc.wet.gz")]},
            {"name": "csv", "kind": "csv", "paths": [str(shared_data / "toxicity_davidson")], "text_field": "tweet",
             "max_docs_per_file": 30},
            {"name": "latex", "kind": "latex", "paths": [str(shared_data / "arxiv_latex_sample")], "max_files": 1,
             "filter_groups": ["gopher_quality"]},
            {"name": "code", "kind": "code", "paths": [str(REPO_ROOT / "llmray" / "data")], "max_files": 5},
            {"name": "machine", "kind": "machine", "machine_kinds": ["pydoc_topics"], "max_docs_per_file": 25},
            {"name": "absent", "kind": "jsonl", "paths": [str(root / "missing")], "optional": True},
        ],
        "sample_rejected": 2,
        "output": {"rows_per_file": 40, "row_group_rows": 16},
        "execution": {"batch_rows": 32},
    }
    return {"root": root, "raw": raw, "good_jsonl": lines[:20], "warc_victim": victim}


def _first_html(warc: Path) -> bytes:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    for record in ArchiveIterator(open(warc, "rb"), record_types=WarcRecordType.response, parse_http=True):
        return record.reader.read()
    raise AssertionError("no response record")


def run_curate(raw: dict, run_root: Path):
    cfg = config_lib.from_dict(stages.STAGES["curate"].config_cls, raw)
    return stages.run_stage(stages.STAGES["curate"], cfg, run_root, cluster.RayConfig(), force=True)


def table(output: Path, name: str) -> pa.Table:
    return pq.read_table(output / name)


def parquet_hashes(output: Path) -> dict[str, str]:
    return {str(p.relative_to(output)): runs.sha256_file(p) for p in sorted(output.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def clean_run(corpus, ray_session, tmp_path_factory):
    result = run_curate(corpus["raw"], tmp_path_factory.mktemp("runs") / "clean")
    return result


def test_every_source_kind_runs_end_to_end(clean_run, corpus):
    output = clean_run.output
    documents = table(output, "documents")
    assert documents.schema.names == ["id", "text", "source", "url", "lang", "lang_score", "quality_score",
                                      "toxicity_score", "meta"]
    sources_out = set(documents.column("source").to_pylist())
    assert {"faults", "parquet", "code", "latex"} <= sources_out
    assert len(set(documents.column("id").to_pylist())) == documents.num_rows
    rejected = table(output, "rejected")
    seen = set(documents.column("source").to_pylist()) | set(rejected.column("source").to_pylist())
    assert {"texts", "html", "warc", "wet", "csv", "machine"} <= seen  # read: kept or dropped with a reason
    assert all(r is not None for r in rejected.column("reason").to_pylist())
    funnel = json.loads((output / "funnel.json").read_text())
    assert funnel["totals"]["documents_out"] == documents.num_rows
    assert [s["stage"] for s in funnel["stages"]][:3] == ["read", "normalize", "gopher_repetition"]
    first, last = funnel["stages"][0], funnel["stages"][-1]
    assert first["docs_in"] == documents.num_rows + rejected.num_rows + table(output, "quarantine").num_rows
    assert last["docs_out"] == documents.num_rows
    report = (output / "funnel.md").read_text()
    assert "| read |" in report and "## Drops by reason" in report and (output / "funnel_gopher_quality.png").is_file()
    samples = [json.loads(line) for line in (output / "rejected_samples.jsonl").read_text().splitlines()]
    per_reason = {}
    for sample in samples:
        per_reason[(sample["stage"], sample["reason"])] = per_reason.get((sample["stage"], sample["reason"]), 0) + 1
    assert samples and max(per_reason.values()) <= 2


def test_bad_inputs_are_quarantined_and_good_records_kept(clean_run, corpus):
    output = clean_run.output
    quarantine = table(output, "quarantine").to_pylist()
    by_kind = {(Path(q["path"]).name, q["error"]): q for q in quarantine}
    assert by_kind[("good_and_bad.jsonl", "JSONDecodeError")]["offset"] == 11  # quarantine: 1-based lines
    assert by_kind[("good_and_bad.jsonl", "InvalidUTF8")]["offset"] == 12
    assert ("truncated.jsonl.gz", "EOFError") in by_kind
    assert ("binary.txt", "BinaryContent") in by_kind
    assert by_kind[("huge.txt", "DocumentTooLarge")]["offset"] == 0
    assert [(q["offset"], q["error"]) for q in quarantine if Path(q["path"]).name == "broken.warc.gz"] == \
        [(corpus["warc_victim"], "CorruptGzipMember")]
    # Every good record of the faulty files was read: kept, or dropped by a filter with a reason.
    from llmray.data import records

    documents, rejected = table(output, "documents"), table(output, "rejected")
    ids = set(documents.column("id").to_pylist()) | set(rejected.column("id").to_pylist())
    good_offsets = list(range(10)) + list(range(12, 22))
    assert {records.document_id("faults", "good_and_bad.jsonl", o) for o in good_offsets} <= ids
    first_unread_line = by_kind[("truncated.jsonl.gz", "EOFError")]["offset"]
    assert first_unread_line > 1
    assert {records.document_id("faults", "truncated.jsonl.gz", o) for o in range(first_unread_line - 1)} <= ids
    empty = {r["id"]: r["reason"] for r in rejected.to_pylist() if r["stage"] == "normalize"}
    assert empty[records.document_id("texts", "empty.txt", 0)] == "empty"
    funnel = json.loads((output / "funnel.json").read_text())
    assert sum(q["records"] for q in funnel["quarantine"]) == len(quarantine)


SMALL = {"output": {"rows_per_file": 30, "row_group_rows": 8}}


def small_config(corpus) -> dict:
    raw = json.loads(json.dumps(corpus["raw"]))
    raw["sources"] = [s for s in raw["sources"] if s["name"] in ("faults", "parquet", "machine", "code", "warc")]
    raw.update(SMALL)
    return raw


@pytest.fixture(scope="module")
def small_clean(corpus, ray_session, tmp_path_factory):
    return run_curate(small_config(corpus), tmp_path_factory.mktemp("small") / "clean")


def test_output_is_byte_identical_across_runs_and_parallelism(corpus, small_clean, tmp_path):
    raw = small_config(corpus)
    raw["execution"] = {"actors": 1, "batch_rows": 7, "read_batch_rows": 5}
    other = run_curate(raw, tmp_path / "other")
    hashes = parquet_hashes(small_clean.output)
    assert len(hashes) >= 3 and hashes == parquet_hashes(other.output)


ONE_CPU_CURATE = """
import json, sys
from llmray import cluster, config as config_lib, stages
stage = stages.STAGES["curate"]
cfg = config_lib.from_dict(stage.config_cls, json.loads(sys.argv[1]))
stages.run_stage(stage, cfg, sys.argv[2], cluster.RayConfig(num_cpus=1, dashboard=False))
"""


def test_a_one_cpu_machine_curates_the_same_bytes(corpus, small_clean, tmp_path):
    """On a fresh 1-CPU Ray (a small container, a 1-CPU node) curate finishes with the same files:
    the classifier actors hold half the CPU for the whole stream, so every other task must fit in
    the rest (a 1-CPU repartition task waited forever before)."""
    run_root = tmp_path / "one_cpu"
    try:
        child = subprocess.run([sys.executable, "-c", ONE_CPU_CURATE, json.dumps(small_config(corpus)), str(run_root)],
                               timeout=240, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                               capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"curate on 1 CPU did not finish in 240 s:\n{(exc.stderr or '')[-3000:]}") from None
    assert child.returncode == 0, child.stderr[-3000:]
    assert parquet_hashes(run_root / "curate" / "output") == parquet_hashes(small_clean.output)


def test_sigkill_mid_run_then_restart_matches_a_clean_run(corpus, ray_session, small_clean, tmp_path):
    config_file = tmp_path / "curate.yaml"
    config_file.write_text(json.dumps(small_config(corpus)))
    command = [sys.executable, "-c", "import sys; from llmray.cli import main; sys.exit(main(sys.argv[1:]))",
               "curate", "--config", str(config_file), "--run", "killed", "--runs-dir", str(tmp_path / "runs")]
    env = {**os.environ, "RAY_ADDRESS": ray_session.address}
    partial = tmp_path / "runs" / "killed" / "curate" / "output.partial" / "documents"
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (partial.is_dir() and any(partial.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "killed" / "curate" / "output").exists()
    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert parquet_hashes(tmp_path / "runs" / "killed" / "curate" / "output") == parquet_hashes(small_clean.output)

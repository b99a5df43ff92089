"""The data-ablation loop end to end on real data: the shipped ``configs/tune/data_ablation_tiny.yaml``
(scaled down) curates Common Crawl + C4 text with and without the heuristic filters, trains a
tokenizer, token shards, a proxy model, and evaluates it; two seeds per setting share the data
stages through the lineage cache, which the test checks from the stage manifests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llmray import config as config_lib
from llmray import stages

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tune" / "data_ablation_tiny.yaml"
SMALLER = ["stages.tokenizer.vocab_size=512", "stages.proxy.batch.seq_len=64", "stages.proxy.train.steps=20",
           "stages.proxy.train.eval_every=20", "stages.eval.limit=3", "stages.eval.tasks=[bpb_wikipedia,arc_easy]"]


def _shrink(raw: dict, shared_data: Path) -> dict:
    raw = config_lib.apply_overrides(raw, SMALLER)
    raw["stages"]["eval"]["data_dir"] = str(shared_data)
    for source, cap in zip(raw["stages"]["curate"]["sources"], (40, 30)):  # overrides cannot index lists
        source["max_docs_per_file"] = cap
        source["paths"] = [str(shared_data / Path(p).relative_to("../shared/data")) for p in source["paths"]]
    return raw


def test_data_ablation_reports_setting_and_score_and_reuses_unchanged_stages(ray_session, shared_data, tmp_path):
    raw = _shrink(config_lib.read_yaml(CONFIG), shared_data)
    stage = stages.STAGES["tune"]
    run_root = tmp_path / "ablation"
    result = stages.run_stage(stage, stages.build_config(stage, raw, run_root), run_root)

    with open(result.output / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(row["status"] == "completed" for row in rows), rows
    metric = raw["metric"]
    for row in rows:  # per trial: the curation setting and the eval score
        assert row["curate.filters.text_groups"] in ("[]", "['gopher_repetition', 'gopher_quality', 'c4', 'fineweb']")
        assert 0 < float(row[metric]) < 20 and row["eval.base.core"] != ""
        assert int(row["curate.documents_out"]) > 0
    kept = {row["curate.filters.text_groups"]: int(row["curate.documents_out"]) for row in rows}
    assert kept["[]"] > kept["['gopher_repetition', 'gopher_quality', 'c4', 'fineweb']"]  # the filters drop docs

    lineage = json.loads((result.output / "lineage.json").read_text())
    for name in ("curate", "tokenizer", "tokens"):
        assert lineage["stages"][name] == {"keys": 2, "ran": 2, "reused": 2}, lineage["stages"]
    for name in ("proxy", "eval"):
        assert lineage["stages"][name] == {"keys": 4, "ran": 4, "reused": 0}, lineage["stages"]

    # From the manifests: each data setting has one complete curate run, used by both of its trials,
    # and it finished before the trial that reused it started.
    trials_dir = run_root / "tune" / "work" / "trials"
    by_setting: dict[str, list[Path]] = {}
    for record in lineage["trials"].values():
        by_setting.setdefault(json.dumps(record["config"]["curate.filters.text_groups"]), []).append(
            trials_dir / record["trial_id"])
    manifests = sorted((run_root / "tune" / "work" / "stages").glob("curate-*/curate/manifest.json"))
    assert len(manifests) == 2
    for trial_dirs in by_setting.values():
        curate_runs = [json.loads((d / "trial.json").read_text())["stages"][0] for d in trial_dirs]
        curate_dirs = {run["directory"] for run in curate_runs}
        assert len(curate_dirs) == 1 and all(run["name"] == "curate" for run in curate_runs)
        manifest = json.loads((Path(curate_dirs.pop()) / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        reuser = next(d for d, run in zip(trial_dirs, curate_runs) if run["reused"])
        started = json.loads((reuser / "attempts.jsonl").read_text().splitlines()[0])["time"]
        assert manifest["finished_at"] <= _iso(started)


def _iso(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))

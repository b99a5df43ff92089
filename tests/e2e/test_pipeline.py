"""`llmray pipeline` lineage: a second run does no work; changing one pretrain key re-runs
pretrain and everything after it, and nothing before (asserted from the manifests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmray import config as config_lib
from llmray.pipeline import PipelineConfig, run_pipeline

pytestmark = pytest.mark.ray
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ORDER = ["tokenizer", "tokens", "pretrain", "eval"]


def _documents(tmp_path: Path, shared_data: Path) -> Path:
    """Real text: Wikipedia and Shakespeare lines as JSONL documents."""
    path = tmp_path / "docs.jsonl"
    lines = (shared_data / "wikipedia_sample" / "wiki_demo.txt").read_text().splitlines()
    shakespeare = (shared_data / "books_tinyshakespeare").glob("*.txt")
    with open(path, "w") as handle:
        for index, text in enumerate(line for line in lines if len(line) > 200):
            handle.write(json.dumps({"id": f"wiki-{index}", "text": text, "source": "wiki"}) + "\n")
        for file in shakespeare:
            for index, block in enumerate(file.read_text().split("\n\n")[:400]):
                handle.write(json.dumps({"id": f"{file.stem}-{index}", "text": block, "source": "books"}) + "\n")
    return path


def _pipeline(docs: Path, shared_data: Path, steps: int) -> PipelineConfig:
    raw = {
        "name": "e2e",
        "stages": {
            "tokenizer": {"include": str(CONFIGS / "tokenizer/tiny.yaml"), "documents": str(docs),
                          "vocab_size": 512, "char_budget": 200_000, "report_chars": 20_000},
            "tokens": {"include": str(CONFIGS / "tokens/tiny.yaml"), "documents": str(docs)},
            "pretrain": {"include": str(CONFIGS / "train/tiny.yaml"), "model": {"vocab_size": 512},
                         "train": {"steps": steps, "eval_every": 4, "checkpoint_every": 4, "log_every": 2}},
            "eval": {"include": str(CONFIGS / "eval/tiny.yaml"), "tasks": ["arc_easy"], "limit": 8,
                     "data_dir": str(shared_data), "runner": {"num_actors": 1}},
        },
    }
    return config_lib.from_dict(PipelineConfig, _resolve(raw))


def _resolve(raw: dict) -> dict:
    """Resolve the per-stage `include:` keys the way a pipeline YAML file would."""
    stages = {}
    for name, section in raw["stages"].items():
        section = dict(section)
        base = config_lib.read_yaml(section.pop("include"))
        stages[name] = config_lib.deep_merge(base, section)
    return {**raw, "stages": stages}


def _manifests(run_root: Path) -> dict[str, dict]:
    return {stage: json.loads((run_root / stage / "manifest.json").read_text()) for stage in ORDER}


def test_second_run_is_cached_and_a_pretrain_change_reruns_only_downstream(ray_session, tmp_path, shared_data):
    docs = _documents(tmp_path, shared_data)
    runs_dir = tmp_path / "runs"
    first = run_pipeline(_pipeline(docs, shared_data, steps=8), runs_dir)
    assert [r.skipped for r in first] == [False] * 4
    before = _manifests(runs_dir / "e2e")
    assert all(m["status"] == "complete" for m in before.values())

    second = run_pipeline(_pipeline(docs, shared_data, steps=8), runs_dir)
    assert [r.skipped for r in second] == [True] * 4
    assert _manifests(runs_dir / "e2e") == before

    third = run_pipeline(_pipeline(docs, shared_data, steps=10), runs_dir)
    assert [r.skipped for r in third] == [True, True, False, False]
    after = _manifests(runs_dir / "e2e")
    for stage in ("tokenizer", "tokens"):
        assert after[stage] == before[stage]
    for stage in ("pretrain", "eval"):
        assert after[stage]["started_at"] >= before[stage]["finished_at"]
    assert after["pretrain"]["config_sha256"] != before["pretrain"]["config_sha256"]
    # eval's own config is unchanged: it re-ran because its input, the pretrained model, changed
    assert after["eval"]["config_sha256"] == before["eval"]["config_sha256"]
    assert after["eval"]["inputs"] != before["eval"]["inputs"]

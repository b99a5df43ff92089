"""Curate with dedup on: planted exact and near duplicates of real C4 documents are rejected with
the id of the document kept, a document embedding an ARC question is decontaminated, and the funnel
counts every dedup stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmray import cluster, config as config_lib, stages
from llmray.data import curate

pytestmark = pytest.mark.ray


def _long_c4_texts(shared_data: Path, n: int) -> list[str]:
    texts = []
    with open(shared_data / "c4_sample" / "c4_demo.jsonl", encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            if 250 <= len(text.split()) <= 800:
                texts.append(text)
            if len(texts) == n:
                return texts
    raise AssertionError("not enough long C4 documents")


def _near_copy(text: str) -> str:
    words = text.split(" ")
    for i in (len(words) // 3, 2 * len(words) // 3):
        words[i] = words[i] + "s"  # two edited words: 5-gram Jaccard ~0.93
    return " ".join(words)


def _arc_question(shared_data: Path) -> str:
    with open(shared_data / "arc" / "ARC-Easy-Dev.jsonl", encoding="utf-8") as handle:
        for line in handle:
            stem = json.loads(line)["question"]["stem"]
            if len(stem.split()) >= 20:
                return stem
    raise AssertionError("no long ARC question")


@pytest.fixture(scope="module")
def dedup_run(shared_data, ray_session, tmp_path_factory):
    *originals, host = _long_c4_texts(shared_data, 13)
    planted = [originals[0], _near_copy(originals[1]), host + "\n\n" + _arc_question(shared_data)]
    root = tmp_path_factory.mktemp("dedup_corpus")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as handle:
        for text in originals + planted:
            handle.write(json.dumps({"text": text}) + "\n")
    raw = {
        "sources": [{"name": "c4", "kind": "jsonl", "paths": [str(root / "docs.jsonl")]}],
        "dedup": {"num_partitions": 2, "decontam": {"data_dir": str(shared_data),
                                                    "tasks": {"arc": ["arc/ARC-Easy-Dev.jsonl"],
                                                              "absent": ["no/such/file.jsonl"]}}},
        "execution": {"batch_rows": 4},
    }
    cfg = config_lib.from_dict(stages.STAGES["curate"].config_cls, raw)
    result = stages.run_stage(stages.STAGES["curate"], cfg, tmp_path_factory.mktemp("runs") / "dedup",
                              cluster.RayConfig(), force=True)
    return result.output, len(originals)


def test_planted_duplicates_are_rejected_with_the_kept_id(dedup_run):
    output, n_originals = dedup_run
    documents = pq.read_table(output / "documents").to_pylist()
    rejected_rows = pq.read_table(output / "rejected").to_pylist()
    rejected = {(r["stage"], r["reason"]): r for r in rejected_rows}
    ids = [d["id"] for d in documents]
    assert sorted(r["stage"] for r in rejected_rows if r["stage"] in curate.dedup_lib.STAGES) == \
        ["decontamination", "exact_dedup", "near_dedup"]
    exact, near = rejected[("exact_dedup", "exact_duplicate")], rejected[("near_dedup", "near_duplicate")]
    contaminated = rejected[("decontamination", "eval_ngram_overlap")]
    assert exact["detail"] in ids and near["detail"] in ids and contaminated["detail"] == "arc"
    assert {exact["id"], near["id"], contaminated["id"]}.isdisjoint(ids)
    # the kept document of each pair is the smallest id of the pair (keep: first_id)
    assert exact["detail"] < exact["id"] and near["detail"] < near["id"]
    assert len(documents) + len(rejected_rows) == n_originals + 1 + 2  # nothing lost or invented


def test_funnel_counts_dedup_stages(dedup_run):
    output, _ = dedup_run
    funnel = json.loads((output / "funnel.json").read_text())
    stages_ = {s["stage"]: s for s in funnel["stages"]}
    assert [s for s in stages_ if s in curate.dedup_lib.STAGES] == list(curate.dedup_lib.STAGES)
    assert stages_["exact_dedup"]["docs_in"] - stages_["exact_dedup"]["docs_out"] == 1
    assert stages_["near_dedup"]["docs_in"] - stages_["near_dedup"]["docs_out"] == 1
    assert stages_["decontamination"]["docs_in"] - stages_["decontamination"]["docs_out"] == 1
    stats = json.loads((output / "dedup_stats.json").read_text())
    assert stats["near_dedup"]["clusters"] == 1 and stats["decontamination"]["tasks"]["arc"]["documents"] == 1

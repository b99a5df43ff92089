"""Decontamination: training documents that embed evaluation items are flagged or dropped, by task."""

from __future__ import annotations

import json

import pytest

from llmray.config import from_dict
from llmray.data.dedup import DedupConfig, deduplicate

pytestmark = pytest.mark.ray


def arc_questions(shared_data, short: bool) -> list[str]:
    with open(shared_data / "arc" / "ARC-Easy-Dev.jsonl", encoding="utf-8") as f:
        stems = [json.loads(line)["question"]["stem"] for line in f]
    return [s for s in stems if (8 <= len(s.split()) < 13) == short and len(s.split()) >= 8]


@pytest.fixture(scope="module")
def documents(shared_data) -> list[dict]:
    with open(shared_data / "c4_sample" / "c4_demo.jsonl", encoding="utf-8") as f:
        c4 = [json.loads(line)["text"] for line in f][:80]
    docs = [{"id": f"c4-{i:03d}", "text": t, "source": "c4", "quality_score": 0.5, "meta": "{}"}
            for i, t in enumerate(c4)]
    long_q, short_q = arc_questions(shared_data, short=False)[3], arc_questions(shared_data, short=True)[0]
    piqa_goal = json.loads((shared_data / "piqa" / "valid.jsonl").read_text().splitlines()[7])["sol1"]
    docs.append({"id": "quiz-arc", "text": f"{c4[0][:300]}\nQuiz time! {long_q} Write your answer below.",
                 "source": "web", "quality_score": 0.5, "meta": "{}"})
    docs.append({"id": "quiz-arc-short", "text": f"Homework: {short_q.upper()} Discuss with a friend.",
                 "source": "web", "quality_score": 0.5, "meta": "{}"})
    docs.append({"id": "howto-piqa", "text": f"My tip of the day. {piqa_goal} Works every time.",
                 "source": "web", "quality_score": 0.5, "meta": '{"kind": "blog"}'})
    return docs


def config(shared_data, action: str) -> DedupConfig:
    return from_dict(DedupConfig, {"decontam": {
        "action": action, "data_dir": str(shared_data),
        "tasks": {"arc": ["arc/ARC-Easy-Dev.jsonl", "arc/ARC-Challenge-Dev.jsonl"],
                  "piqa": ["piqa/valid.jsonl"], "boolq": ["boolq/boolq.jsonl"]}}})


def test_documents_embedding_eval_items_are_dropped_and_reported(ray_session, shared_data, documents):
    import ray

    result = deduplicate(ray.data.from_items(documents).repartition(3), config(shared_data, "drop"))
    kept = {r["id"] for r in result.documents.take_all()}
    rejected = {r["id"]: r for r in result.rejected.take_all()}
    assert {"quiz-arc", "quiz-arc-short", "howto-piqa"}.isdisjoint(kept)
    assert rejected["quiz-arc"]["stage"] == "decontamination" and rejected["quiz-arc"]["value"] == "arc"
    assert rejected["quiz-arc-short"]["value"] == "arc"
    assert rejected["howto-piqa"]["value"] == "piqa"
    report = result.stats["decontamination"]["tasks"]
    assert report["arc"]["documents"] == 2 and report["arc"]["example_ids"] == ["quiz-arc", "quiz-arc-short"]
    assert report["piqa"]["documents"] == 1 and report["boolq"]["documents"] == 0
    assert all(d["id"] in kept for d in documents if d["source"] == "c4")


def test_flag_mode_keeps_documents_and_names_tasks_in_meta(ray_session, shared_data, documents):
    import ray

    result = deduplicate(ray.data.from_items(documents).repartition(2), config(shared_data, "flag"))
    meta = {r["id"]: json.loads(r["meta"]) for r in result.documents.take_all()}
    assert meta["quiz-arc"]["contamination"] == ["arc"]
    assert meta["howto-piqa"] == {"kind": "blog", "contamination": ["piqa"]}
    assert "contamination" not in meta["c4-000"]
    assert result.stats["decontamination"]["documents_flagged"] == 3
    assert result.stats["decontamination"]["documents_removed"] == 0


def test_missing_task_file_is_named(shared_data):
    cfg = from_dict(DedupConfig, {"decontam": {"data_dir": str(shared_data), "tasks": {"mine": ["nope.jsonl"]}}})
    with pytest.raises(FileNotFoundError, match=r"decontam.tasks.mine: evaluation file .*nope.jsonl"):
        cfg.decontam.task_files()

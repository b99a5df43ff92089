"""Curate with dedup on: planted exact and near duplicates of real C4 documents are rejected with
the id of the document kept, a document embedding an ARC question is decontaminated, and the funnel
counts every dedup stage. With boilerplate removal and ``decontam.action: flag``, the same kept
documents lose exactly the banner lines that a run without them keeps, documents left too short are
rejected, the contaminated document is kept with ``meta.contamination``, and the funnel says so."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmray import cluster, config as config_lib, stages
from llmray.data import curate, records

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


# A site banner (six sentences, each passing every heuristic filter) around each hosted article.
BANNER = [
    "Subscribe to our weekly newsletter and never miss the best stories from the valley.",
    "Our reporters cover local news, sports and culture for readers across the whole region.",
    "Support independent journalism by becoming a member of the community today.",
    "All stories on this site are written and edited by people who live here.",
    "Send your questions and story ideas to the newsroom through the contact page.",
    "Thank you for reading, and please share this article with your friends and family.",
]
# 37 words: different enough from the banner alone not to be its near-duplicate, fewer than min_words
SHORT_TAIL = ("The mayor said on Tuesday that the new bridge over the river will open to traffic next spring.\n"
              "Workers are still paving the eastern ramp, and the council expects the final inspection "
              "to take about two weeks.")


def _curate(corpus: Path, dedup: dict, run_dir: Path) -> Path:
    raw = {"sources": [{"name": "site", "kind": "jsonl", "paths": [str(corpus)]}], "dedup": dedup,
           "execution": {"batch_rows": 4}}
    cfg = config_lib.from_dict(stages.STAGES["curate"].config_cls, raw)
    return stages.run_stage(stages.STAGES["curate"], cfg, run_dir, cluster.RayConfig(), force=True).output


@pytest.fixture(scope="module")
def edit_runs(shared_data, ray_session, tmp_path_factory):
    """The same banner-wrapped corpus curated with dedup's defaults (boilerplate off, decontamination
    drops) and with boilerplate removal (min_words 50) and contamination flags."""
    *hosts, host = _long_c4_texts(shared_data, 10)
    hosts.append(host + "\n\n" + _arc_question(shared_data))
    texts = ["\n".join(BANNER[:3] + [h] + BANNER[3:]) for h in hosts]
    texts += ["\n".join(BANNER), "\n".join(BANNER + [SHORT_TAIL])]
    root = tmp_path_factory.mktemp("banner_corpus")
    with open(root / "site.jsonl", "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    ids = [records.document_id("site", "site.jsonl", i) for i in range(len(texts))]
    decontam = {"data_dir": str(shared_data), "tasks": {"arc": ["arc/ARC-Easy-Dev.jsonl"]}}
    runs = tmp_path_factory.mktemp("edit_runs")
    base = _curate(root / "site.jsonl", {"num_partitions": 2, "decontam": decontam}, runs / "base")
    edited = _curate(root / "site.jsonl", {"num_partitions": 2,
                                           "boilerplate": {"enabled": True, "max_documents": 3, "min_words": 50},
                                           "decontam": {**decontam, "action": "flag"}}, runs / "edited")
    return base, edited, {"hosts": ids[:len(hosts)], "arc": ids[len(hosts) - 1], "banner_only": ids[-2],
                          "short": ids[-1]}


def _by_id(output: Path, name: str) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(output / name).to_pylist()}


def test_boilerplate_lines_leave_kept_documents_and_short_ones_are_rejected(edit_runs):
    base, edited, ids = edit_runs
    base_docs, docs = _by_id(base, "documents"), _by_id(edited, "documents")
    assert {ids["banner_only"], ids["short"]} <= set(base_docs)  # they reach dedup in both runs
    assert base_docs[ids["banner_only"]]["text"] == "\n".join(BANNER)
    rejected = _by_id(edited, "rejected")
    for doc_id in (ids["banner_only"], ids["short"]):
        assert (rejected[doc_id]["stage"], rejected[doc_id]["reason"], rejected[doc_id]["detail"]) == \
            ("boilerplate", "too_short_after_boilerplate", None)
    assert set(docs) == set(base_docs) - {ids["banner_only"], ids["short"]} | {ids["arc"]}
    assert set(docs) >= set(ids["hosts"])
    for doc_id, doc in base_docs.items():
        if doc_id in docs:
            expected = "\n".join(line for line in doc["text"].split("\n") if line not in BANNER)
            assert docs[doc_id]["text"] == expected != doc["text"]
    assert not any(line in doc["text"] for doc in docs.values() for line in BANNER)
    funnel = json.loads((edited / "funnel.json").read_text())
    row = {s["stage"]: s for s in funnel["stages"]}["boilerplate"]
    assert row["docs_in"] - row["docs_out"] == 2
    assert row["edits"]["documents_changed"] == len(docs) and row["edits"]["lines_removed"] == 6 * len(docs)
    assert "lines removed" in (edited / "funnel.md").read_text()
    assert json.loads((edited / "dedup_stats.json").read_text())["boilerplate"]["lines_flagged"] == len(BANNER)


def test_flagged_documents_are_kept_with_their_tasks_in_meta(edit_runs):
    base, edited, ids = edit_runs
    base_rejected, docs = _by_id(base, "rejected"), _by_id(edited, "documents")
    assert (base_rejected[ids["arc"]]["stage"], base_rejected[ids["arc"]]["detail"]) == ("decontamination", "arc")
    assert json.loads(docs[ids["arc"]]["meta"]) == {"contamination": ["arc"]}
    assert all("contamination" not in json.loads(d["meta"]) for i, d in docs.items() if i != ids["arc"])
    assert not any(r["stage"] == "decontamination" for r in _by_id(edited, "rejected").values())
    funnel = json.loads((edited / "funnel.json").read_text())
    row = {s["stage"]: s for s in funnel["stages"]}["decontamination"]
    assert row["docs_in"] == row["docs_out"] and row["edits"] == {"documents_flagged": 1}
    assert all("edits" not in s for s in json.loads((base / "funnel.json").read_text())["stages"])
    assert "1 documents flagged" in (edited / "funnel.md").read_text()

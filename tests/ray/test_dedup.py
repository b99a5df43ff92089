"""Dedup on Ray against single-process references, on real text with planted duplicates."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from llmray.config import from_dict
from llmray.data.dedup import DedupConfig, deduplicate, node_ids, text_hash
from llmray.data.readers.machine_text import discover, read_documents
from llmray.data.dedup.minhash import MinHasher, jaccard

pytestmark = pytest.mark.ray
NO_DECONTAM = {"decontam": {"enabled": False}}
PLAIN_LSH = {**NO_DECONTAM, "minhash": {"verify": False}}  # clusters from band matches alone


def edit(text: str, fraction: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = f"zz{rng.randrange(10**6)}"
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(shared_data) -> list[dict]:
    """c4 + wikipedia + /usr/share/doc copyright files (real license near-duplicates), plus
    planted exact copies (case/whitespace changed), near copies (~2% words edited) and a chain
    A~B~C with A and C not similar."""
    rng = random.Random(0)
    with open(shared_data / "c4_sample" / "c4_demo.jsonl", encoding="utf-8") as f:
        c4 = [json.loads(line)["text"] for line in f]
    wiki = (shared_data / "wikipedia_sample" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    docs = [{"id": f"c4-{i:03d}", "text": t, "source": "c4"} for i, t in enumerate(c4[:150])]
    docs += [{"id": f"wiki-{i:02d}", "text": t, "source": "wiki"} for i, t in enumerate(wiki) if t.strip()]
    copyright_files = [f for f in discover(["doc"]) if f.path.endswith("/copyright")][:60]
    docs += [{"id": f"doc-{i:02d}", "text": text, "source": "doc"}
             for i, f in enumerate(copyright_files) for _, text, _ in read_documents(f, 10 << 20)]
    long_c4 = [t for t in c4[150:] if len(t.split()) > 300]
    for i, text in enumerate(long_c4[:8]):
        docs.append({"id": f"p{i}-a-orig", "text": text, "source": "planted"})
        docs.append({"id": f"p{i}-b-near", "text": edit(text, 0.02, rng), "source": "planted"})
        docs.append({"id": f"p{i}-c-exact", "text": "  " + text.upper().replace(" ", "\n"), "source": "planted"})
    docs += [{"id": f"chain-{name}", "text": text, "source": "planted"}
             for name, text in zip("abc", chain_texts(shared_data))]
    for i, doc in enumerate(docs):
        doc["quality_score"] = round(random.Random(i).random(), 3)
        doc["meta"] = "{}"
    return docs


def chain_texts(shared_data) -> list[str]:
    """Three windows A, B, C over a book, shifted so that A and B, and B and C, share an LSH band
    but A and C share none (A~B, B~C, A!~C), found deterministically."""
    words = book_words(shared_data, 5000, 1000)
    hasher = MinHasher()
    for shift in range(40, 160, 5):
        texts = [" ".join(words[k * shift:k * shift + 500]) for k in range(3)]
        keys, _ = hasher.document_band_keys(texts)
        share = [np.intersect1d(keys[i], keys[j]).size > 0 for i, j in ((0, 1), (1, 2), (0, 2))]
        if share == [True, True, False]:
            return texts
    raise AssertionError("no shift gives a chain")


def book_words(shared_data, start: int, count: int) -> list[str]:
    import gzip

    text = gzip.decompress((shared_data / "books_gutenberg" / "pg174_dorian_gray.txt.gz").read_bytes()).decode("utf-8")
    return text.split()[start:start + count]


def candidates_below(shared_data, threshold: float) -> tuple[str, str]:
    """Two overlapping windows over a book that share an LSH band although their exact Jaccard
    is below ``threshold`` (a false candidate of plain LSH), found deterministically."""
    words = book_words(shared_data, 0, 60000)
    hasher = MinHasher()
    for start in range(10000, 59000, 700):
        for shift in range(75, 130, 6):
            texts = [" ".join(words[start:start + 500]), " ".join(words[start + shift:start + shift + 500])]
            keys, _ = hasher.document_band_keys(texts)
            shingles, offsets = hasher.shingles(texts)
            similarity = jaccard(shingles[:offsets[1]], shingles[offsets[1]:])
            if np.intersect1d(keys[0], keys[1]).size and similarity < threshold - 0.05:
                return texts[0], texts[1]
    raise AssertionError("no window pair gives a false candidate")


def run(ray_session, docs, cfg: dict, blocks: int = 4):
    import ray

    result = deduplicate(ray.data.from_items(docs).repartition(blocks), from_dict(DedupConfig, cfg))
    kept = sorted(r["id"] for r in result.documents.take_all())
    rejected = sorted((r["id"], r["stage"], r["reason"], r["value"]) for r in result.rejected.take_all())
    return kept, rejected, result.stats


def reference(docs: list[dict], keep: str) -> dict[str, tuple[str, str]]:
    """Single process: exact groups by text hash, then LSH candidates (any shared band key)
    merged by a Python union-find; returns removed id -> (stage, kept id)."""
    def preference(doc):
        quality = doc["quality_score"]
        return {"first_id": (doc["id"],), "longest": (-len(doc["text"]), doc["id"]),
                "quality": (-quality, -len(doc["text"]), doc["id"])}[keep]

    removed: dict[str, tuple[str, str]] = {}
    groups: dict[tuple, list[dict]] = {}
    for doc in docs:
        groups.setdefault(text_hash(doc["text"]), []).append(doc)
    survivors = []
    for members in groups.values():
        members.sort(key=preference)
        survivors.append(members[0])
        removed.update({m["id"]: ("exact_dedup", members[0]["id"]) for m in members[1:]})

    keys, has = MinHasher().document_band_keys([d["text"] for d in survivors])
    parent = list(range(len(survivors)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    buckets: dict[int, int] = {}
    for i in range(len(survivors)):
        for key in (keys[i].tolist() if has[i] else []):
            j = buckets.setdefault(key, i)
            parent[find(i)] = find(j)
    clusters: dict[int, list[dict]] = {}
    for i, doc in enumerate(survivors):
        clusters.setdefault(find(i), []).append(doc)
    for members in clusters.values():
        members.sort(key=preference)
        removed.update({m["id"]: ("near_dedup", members[0]["id"]) for m in members[1:]})
    return removed


@pytest.mark.parametrize("keep", ["first_id", "quality"])
def test_matches_single_process_reference(ray_session, corpus, keep):
    kept, rejected, stats = run(ray_session, corpus, {**PLAIN_LSH, "keep": keep})
    expected = reference(corpus, keep)
    assert {r[0]: (r[1], r[3]) for r in rejected} == expected
    assert kept == sorted(d["id"] for d in corpus if d["id"] not in expected)
    assert stats["near_dedup"]["documents_removed"] == sum(1 for s, _ in expected.values() if s == "near_dedup")


def test_planted_duplicates_removed_and_distinct_documents_kept(ray_session, corpus):
    kept, rejected, stats = run(ray_session, corpus, PLAIN_LSH)
    by_id = {r[0]: r for r in rejected}
    for i in range(8):
        assert by_id[f"p{i}-c-exact"][1:] == ("exact_dedup", "exact_duplicate", f"p{i}-a-orig")
        assert by_id[f"p{i}-b-near"][1:] == ("near_dedup", "near_duplicate", f"p{i}-a-orig")
        assert f"p{i}-a-orig" in kept
    # Transitivity: chain-a ~ chain-b ~ chain-c, chain-a !~ chain-c; one cluster, one survivor.
    assert "chain-a" in kept and by_id["chain-b"][3] == "chain-a" and by_id["chain-c"][3] == "chain-a"
    # Every c4 / wikipedia original is distinct and survives.
    assert all(d["id"] in kept for d in corpus if d["source"] in ("c4", "wiki"))
    assert stats["near_dedup"]["clusters"] >= 9 and stats["exact_dedup"]["duplicate_groups"] >= 8
    assert stats["output"]["documents"] == len(kept)


def test_deterministic_across_runs_blocks_and_partitions(ray_session, corpus):
    first = run(ray_session, corpus, PLAIN_LSH, blocks=4)
    again = run(ray_session, corpus, PLAIN_LSH, blocks=4)
    other = run(ray_session, corpus, {**PLAIN_LSH, "num_partitions": 3, "batch_size": 17}, blocks=9)
    spanning = run(ray_session, corpus, {**PLAIN_LSH, "block_rows": 23}, blocks=37)  # slices span blocks
    assert first[:2] == again[:2] == other[:2] == spanning[:2]


@pytest.mark.parametrize("block_sizes, block_rows, cpus, expected_rows", [
    ([7] * 50, 20, 1, [20] * 17 + [10]),  # small blocks are joined into slices of block_rows
    ([100], 8192, 2, [25] * 4),  # one large block is cut into two slices per CPU
    ([3, 0, 40, 1, 9], 16, 1, [16, 16, 16, 5]),  # empty and uneven blocks
])
def test_row_slices_cover_the_rows_in_order_whatever_the_blocks(ray_session, block_sizes, block_rows, cpus,
                                                                 expected_rows):
    import pyarrow as pa
    import ray

    from llmray.data.dedup import row_slices

    first = np.cumsum([0, *block_sizes])
    dataset = ray.data.from_arrow([pa.table({"row": np.arange(start, start + size)})
                                   for start, size in zip(first, block_sizes)])
    slices = row_slices(dataset, block_rows, cpus)
    tables = [s.table() for s in slices]
    assert [t.num_rows for t in tables] == expected_rows
    assert [s.position for s in slices] == np.cumsum([0, *expected_rows[:-1]]).tolist()
    assert [r for t in tables for r in t.column("row").to_pylist()] == list(range(sum(block_sizes)))


ONE_CPU_RUN = """
import json, sys
import ray
from llmray.config import from_dict
from llmray.data.dedup import DedupConfig, deduplicate
ray.init(address="local", num_cpus=1, include_dashboard=False)
result = deduplicate(ray.data.read_parquet(sys.argv[1]), from_dict(DedupConfig, json.loads(sys.argv[2])))
rejected = sorted([r["id"], r["stage"], r["reason"], r["value"]] for r in result.rejected.take_all())
print("RESULT", json.dumps({"kept": sorted(r["id"] for r in result.documents.take_all()), "rejected": rejected,
                            "partitions": result.stats["partitions"]}), flush=True)
"""


def test_same_result_on_a_one_cpu_cluster(ray_session, corpus, tmp_path):
    """The distributed plan's partition count follows the cluster's CPUs; a fresh 1-CPU Ray in a
    child process (one partition, one task at a time) removes exactly the documents the 2-CPU
    session does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(corpus), tmp_path / "docs.parquet")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cfg = {**NO_DECONTAM, "plan": "distributed"}
    child = subprocess.run([sys.executable, "-c", ONE_CPU_RUN, str(tmp_path / "docs.parquet"), json.dumps(cfg)],
                           capture_output=True, text=True, timeout=600, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    results = [line.split(" ", 1)[1] for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, child.stdout[-3000:]  # Ray may print its own lines around ours
    one_cpu = json.loads(results[0])
    kept, rejected, stats = run(ray_session, corpus, cfg)
    assert (one_cpu["partitions"], stats["partitions"]) == (1, 2)
    assert one_cpu["kept"] == kept and [tuple(r) for r in one_cpu["rejected"]] == rejected
    assert any(r[1] == "near_dedup" for r in rejected)


def test_boilerplate_lines_removed_and_emptied_documents_rejected(ray_session, corpus):
    import ray

    banner = "We use cookies to improve your experience on this website. Accept all cookies"
    docs = [dict(d, text=f"{banner}\n{d['text']}") if d["source"] == "c4" else d for d in corpus]
    docs.append({"id": "only-banner", "text": banner + "\n\n", "source": "planted", "quality_score": 0.1,
                 "meta": "{}"})
    cfg = {**NO_DECONTAM, "boilerplate": {"enabled": True, "max_documents": 20}, "exact": False,
           "minhash": {"enabled": False}}
    result = deduplicate(ray.data.from_items(docs).repartition(3), from_dict(DedupConfig, cfg))
    texts = {r["id"]: r["text"] for r in result.documents.take_all()}
    # Reference: lines (lower-cased, whitespace collapsed, >= 20 chars) in more than 20 documents.
    counts: dict[str, int] = {}
    for doc in docs:
        for key in {" ".join(line.lower().split()) for line in doc["text"].split("\n")}:
            counts[key] = counts.get(key, 0) + (len(key) >= 20)
    frequent = {k for k, n in counts.items() if n > 20}
    assert " ".join(banner.lower().split()) in frequent
    for doc in docs:
        if doc["id"] != "only-banner":
            expected = [ln for ln in doc["text"].split("\n") if " ".join(ln.lower().split()) not in frequent]
            assert texts[doc["id"]] == "\n".join(expected)
    rejected = {r["id"]: r for r in result.rejected.take_all()}
    assert rejected["only-banner"]["stage"] == "boilerplate" and "only-banner" not in texts
    assert result.stats["boilerplate"]["lines_flagged"] == len(frequent)


def verified_reference(docs: list[dict], threshold: float) -> dict[str, str]:
    """Single process, no exact stage: each LSH bucket joins its members (in node-id order) to the
    first member and to their predecessor, edges below ``threshold`` exact Jaccard are dropped,
    union-find, smallest id kept; returns removed id -> kept id."""
    hasher = MinHasher()
    keys, has = hasher.document_band_keys([d["text"] for d in docs])
    shingles, offsets = hasher.shingles([d["text"] for d in docs])
    nodes = node_ids([d["id"] for d in docs]).tolist()
    buckets: dict[int, list[int]] = {}
    for i in range(len(docs)):
        for key in (keys[i].tolist() if has[i] else []):
            buckets.setdefault(key, []).append(i)
    parent = list(range(len(docs)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    def similar(i, j):
        return jaccard(shingles[offsets[i]:offsets[i + 1]], shingles[offsets[j]:offsets[j + 1]]) >= threshold

    for members in buckets.values():
        members = sorted(set(members), key=nodes.__getitem__)
        for k, i in enumerate(members[1:], start=1):  # star to the centre, chain to the predecessor
            for j in {members[0], members[k - 1]}:
                if similar(i, j):
                    parent[find(i)] = find(j)
    clusters: dict[int, list[str]] = {}
    for i, doc in enumerate(docs):
        clusters.setdefault(find(i), []).append(doc["id"])
    return {m: min(ids) for ids in clusters.values() for m in ids if m != min(ids)}


def test_verification_keeps_only_edges_at_the_jaccard_threshold(ray_session, corpus, shared_data):
    """Plain LSH merges a false candidate pair (J < 0.75); verification (the default) keeps both,
    matches a single-process reference, and still chains A~B~C (J 0.85) whose ends have J 0.72."""
    low_a, low_b = candidates_below(shared_data, 0.8)
    words = book_words(shared_data, 30000, 600)
    chain = {f"vchain-{name}": " ".join(words[k * 40:k * 40 + 500]) for k, name in enumerate("abc")}
    docs = corpus + [{"id": doc_id, "text": text, "source": "planted", "quality_score": 0.5, "meta": "{}"}
                     for doc_id, text in [("low-a", low_a), ("low-b", low_b), *chain.items()]]
    cfg = {**NO_DECONTAM, "exact": False}
    plain = run(ray_session, docs, {**cfg, "minhash": {"verify": False}})
    verified = run(ray_session, docs, cfg)
    assert ("low-b", "near_dedup", "near_duplicate", "low-a") in plain[1]
    assert "low-a" in verified[0] and "low-b" in verified[0]
    hasher = MinHasher()
    shingles, offsets = hasher.shingles(list(chain.values()))
    ends = jaccard(shingles[:offsets[1]], shingles[offsets[2]:])
    assert ends < 0.8 <= jaccard(shingles[:offsets[1]], shingles[offsets[1]:offsets[2]])
    assert {r[0]: r[3] for r in verified[1] if r[0].startswith("vchain")} == \
        {"vchain-b": "vchain-a", "vchain-c": "vchain-a"}
    assert {r[0]: r[3] for r in verified[1]} == verified_reference(docs, 0.8)
    near = verified[2]["near_dedup"]
    assert 0 < near["verified_edges"] < near["candidate_edges"]
    assert all(f"p{i}-b-near" not in verified[0] for i in range(8))  # ~2% edits: far above 0.8
    other = run(ray_session, docs, {**cfg, "num_partitions": 3}, blocks=7)
    assert other[:2] == verified[:2]


@pytest.mark.parametrize("action", ["drop", "flag"])
def test_local_plan_equals_distributed_plan(ray_session, corpus, shared_data, action):
    """Every stage on (boilerplate lines, exact, verified near, decontamination): the one-task plan
    that small inputs get by default gives the same kept documents (every column, in input order),
    the same rejected rows and the same statistics as the distributed plan on 3 partitions."""
    import pyarrow as pa
    import ray

    stem = next(q for q in (json.loads(line)["question"]["stem"] for line in
                            (shared_data / "arc" / "ARC-Easy-Dev.jsonl").read_text().splitlines())
                if len(q.split()) >= 20)
    banner = "Subscribe to our newsletter for weekly updates and special offers"
    docs = [dict(d, text=f"{banner}\n{d['text']}") if d["source"] == "c4" else d for d in corpus]
    docs.append({"id": "quiz", "text": f"{corpus[0]['text'][:400]}\n{stem}", "source": "web",
                 "quality_score": 0.5, "meta": "{}"})
    cfg = {"boilerplate": {"enabled": True, "max_documents": 20},
           "decontam": {"action": action, "data_dir": str(shared_data), "tasks": {"arc": ["arc/ARC-Easy-Dev.jsonl"]}}}
    outputs = {}
    for plan in ("auto", "distributed"):
        result = deduplicate(ray.data.from_items(docs).repartition(4),
                             from_dict(DedupConfig, {**cfg, "plan": plan, "num_partitions": 3}))
        kept = pa.concat_tables(ray.get(result.documents.to_arrow_refs()))
        rejected = pa.concat_tables(ray.get(result.rejected.to_arrow_refs())).sort_by("id")
        stats = dict(result.stats)
        outputs[stats.pop("plan")] = kept, rejected, stats, stats.pop("partitions")
    (kept, rejected, stats, parts), (kept_d, rejected_d, stats_d, parts_d) = outputs["local"], outputs["distributed"]
    assert (parts, parts_d) == (1, 3)
    assert kept.equals(kept_d) and rejected.equals(rejected_d) and stats == stats_d
    assert [r["id"] for r in kept.to_pylist()] == [d["id"] for d in docs if d["id"] in set(kept["id"].to_pylist())]
    stages_hit = set(rejected["stage"].to_pylist())
    assert {"exact_dedup", "near_dedup"} <= stages_hit and stats["boilerplate"]["lines_flagged"] >= 1
    assert ("decontamination" in stages_hit) == (action == "drop")
    assert stats["decontamination"]["documents_flagged"] >= 1

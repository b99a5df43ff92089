"""`llmray tokens` on Ray Data: equal to a single-process reference, deterministic, bad input quarantined."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest

from llmray import stages
from llmray.data.readers import documents
from llmray import runs
from llmray.tokenizer import TOKENIZER_FILE, load_tokenizer, train
from llmray.tokens import shards
from llmray.tokens.loader import TokenLoader
from llmray.tokens.tokenize import Encoder, TokensConfig, read_files
from tests.unit.tokenizer_corpus import write_corpus

BAD_LINES = ('{"text": 5}\n'            # not a string
             'not json\n'               # malformed
             '{"text": "\\ud800 x"}\n'  # lone surrogate: not valid Unicode
             '{"text": ""}\n'           # empty: skipped, not quarantined
             '{"text": "fine document"}\n')


@pytest.fixture(scope="module")
def corpus_and_tokenizer(shared_data, tmp_path_factory):
    corpus = write_corpus(shared_data, tmp_path_factory.mktemp("corpus"))
    (corpus / "zz_bad.jsonl").write_text(BAD_LINES)
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")

    class Ctx:
        output = tokenizer_dir
        logger = logging.getLogger("test.tokens")

        def log_metrics(self, **_):
            pass
    train.run_tokenizer(train.TokenizerConfig(documents=str(corpus), vocab_size=1024, char_budget=300_000,
                                              val_fraction=0.1), Ctx())
    return corpus, tokenizer_dir


def reference_tokens(corpus, tokenizer_dir, val_fraction) -> dict[str, np.ndarray]:
    """Single process: documents in sorted file order, encoded one at a time, split by id hash."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.encode_special_tokens = True
    streams = {"train": [], "val": []}
    for batch in documents.iter_documents(corpus):
        for doc_id, text, error in zip(batch["id"], batch["text"], batch["error"]):
            if error is None and text:
                streams[documents.split_of(doc_id, val_fraction)].extend(tokenizer.encode(text).ids)
    return {split: np.array(ids, dtype=np.uint16) for split, ids in streams.items()}


def read_split(output, manifest, split) -> np.ndarray:
    dtype = np.dtype(manifest["dtype"])
    return np.concatenate([np.fromfile(output / s["path"], dtype=dtype) for s in manifest["splits"][split]["shards"]])


def run_tokens(run_root, corpus, tokenizer_dir, force=False, **overrides):
    cfg = TokensConfig(documents=str(corpus), tokenizer=str(tokenizer_dir), shard_tokens=40_000, **overrides)
    return stages.run_stage(stages.STAGES["tokens"], cfg, run_root, force=force)


def test_tokens_stage_equals_reference_and_is_deterministic(ray_session, corpus_and_tokenizer, tmp_path):
    corpus, tokenizer_dir = corpus_and_tokenizer
    first = run_tokens(tmp_path / "run", corpus, tokenizer_dir, actors=2, plan="actors")
    output = first.output
    manifest = shards.read_manifest(output)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 1024 and manifest["bos_id"] == 0
    assert manifest["val_fraction"] == 0.1  # taken from the tokenizer's held-out fraction
    assert manifest["tokenizer"]["sha256"] == runs.sha256_file(tokenizer_dir / TOKENIZER_FILE)
    reference = reference_tokens(corpus, tokenizer_dir, 0.1)
    for split in ("train", "val"):
        tokens = read_split(output, manifest, split)
        assert np.array_equal(tokens, reference[split])
        assert manifest["splits"][split]["tokens"] == len(tokens)
        assert tokens[0] == manifest["bos_id"]
    assert len(manifest["splits"]["train"]["shards"]) >= 3
    assert set(manifest["source_mixture"]) == {"c4", "shakespeare", "wikipedia", "zz_bad"}
    assert sum(s["tokens"] for s in manifest["splits"]["train"]["sources"].values()) == \
        manifest["splits"]["train"]["tokens"]

    # Bad records are quarantined with where they came from; the run still finished.
    quarantine = [json.loads(line) for line in (output / shards.QUARANTINE).read_text().splitlines()]
    assert [(q["offset"], q["error"]) for q in quarantine] == [(1, "BadText"), (2, "JSONDecodeError"),
                                                                (3, "BadUnicode")]  # 1-based lines
    assert all(q["path"].endswith("zz_bad.jsonl") for q in quarantine)
    assert manifest["quarantined"] == 3 and manifest["skipped_empty"] == 1

    # Another run with one actor and other encode batches writes byte-identical shards; smaller
    # work units cut the same token streams into more shards.
    second = run_tokens(tmp_path / "run2", corpus, tokenizer_dir, actors=1, encode_batch_docs=37, plan="actors")
    assert shards.read_manifest(second.output)["splits"] == manifest["splits"]
    smaller = run_tokens(tmp_path / "run4", corpus, tokenizer_dir, actors=2, read_batch_chars=50_000, plan="actors")
    finer = shards.read_manifest(smaller.output)
    for split in ("train", "val"):
        assert np.array_equal(read_split(smaller.output, finer, split), reference[split])
        assert len(finer["splits"][split]["shards"]) > len(manifest["splits"][split]["shards"])

    # A small input takes the local plan (no Ray Data) and writes the same bytes, quarantine included.
    local = run_tokens(tmp_path / "run3", corpus, tokenizer_dir)
    assert (local.manifest["summary"]["plan"], first.manifest["summary"]["plan"]) == ("local", "actors")
    local_manifest = shards.read_manifest(local.output)
    assert local_manifest["splits"] == manifest["splits"]
    assert (local.output / shards.QUARANTINE).read_text() == (output / shards.QUARANTINE).read_text()
    assert (local_manifest["quarantined"], local_manifest["skipped_empty"]) == (3, 1)

    # Unchanged config and inputs: the lineage cache skips the stage.
    assert run_tokens(tmp_path / "run", corpus, tokenizer_dir, actors=2, plan="actors").skipped

    loader = TokenLoader(output, seq_len=64, batch_size=4, split="val")
    assert next(loader).shape == (4, 65)


def _encoder(tokenizer_dir, output, monkeypatch) -> Encoder:
    for name in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):  # the actor sets them; restore after
        monkeypatch.setenv(name, "1")
    return Encoder(str(tokenizer_dir), val_fraction=0.0, output=str(output), shard_tokens=1000, encode_batch_docs=2)


def test_an_encoding_failure_is_a_bug_that_fails_loudly_not_quarantine(corpus_and_tokenizer, tmp_path, monkeypatch):
    _, tokenizer_dir = corpus_and_tokenizer
    encoder = _encoder(tokenizer_dir, tmp_path, monkeypatch)
    good = np.frombuffer(encoder.encode(["good text"])[0], dtype=np.uint16)
    assert good[0] == 0 and len(good) > 1
    with pytest.raises(TypeError):
        encoder.encode(["good text", None, "more text"])  # only a bug can pass a non-string


def test_an_encoder_writes_whole_units_and_refuses_a_partial_one(corpus_and_tokenizer, tmp_path, monkeypatch):
    """Two units in one block: each gets its own shards, named after it; a block holding only part
    of a unit (its rows say how many it has) is a bug and fails."""
    _, tokenizer_dir = corpus_and_tokenizer
    encoder = _encoder(tokenizer_dir, tmp_path, monkeypatch)
    (tokenizer_dir.parent / "unit.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 60}) + "\n"
                                                             for i in range(6)))
    units = [pa.table(u) for u in read_files({"path": [str(tokenizer_dir.parent / "unit.jsonl")], "unit": [7]},
                                             str(tokenizer_dir.parent), batch_chars=1500)]
    assert [(u["part"][0].as_py(), u.num_rows) for u in units] == [(0, 3), (1, 3)]
    summaries = [json.loads(s) for s in encoder(pa.concat_tables(units))["summary"].to_pylist()]
    assert [(s["unit"], s["part"]) for s in summaries] == [(7, 0), (7, 1)]
    assert [sh["path"] for sh in summaries[1]["splits"]["train"]["shards"]] == ["train/000007-000001-000000.bin"]
    assert summaries[0]["splits"]["train"]["documents"] == 3 and summaries[0]["skipped_empty"] == 0
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000007-000000-000000.bin",
                                                                     "000007-000001-000000.bin"]
    with pytest.raises(RuntimeError, match="work unit 7/1 reached an encoder with 2 of its 3 rows"):
        encoder(pa.concat_tables(units).slice(0, 5))
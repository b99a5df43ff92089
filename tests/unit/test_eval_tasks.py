"""Task loaders on every shipped format (real files from shared/data), the HellaSwag and generic
multiple-choice schemas (files written here), malformed files (errors name file, line, field),
and the shipped task declarations in configs/eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmray import config as config_lib
from llmray.eval.stage import EvalConfig
from llmray.eval.tasks import TaskFormatError, TaskSpec, load_task

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eval"


def load(shared_data: Path, fmt: str, path: str, **spec) -> list:
    return load_task("t", TaskSpec(format=fmt, path=path, **spec), shared_data).examples


def test_arc_easy_dev(shared_data):
    examples = load(shared_data, "arc", "arc/ARC-Easy-Dev.jsonl")
    assert len(examples) == 570
    first = examples[0]
    assert first.id == "MCAS_2000_4_6"
    assert first.contexts == ("Question: Which technology was developed most recently?\nAnswer:",) * 4
    assert first.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert first.gold == 0
    numeric = next(e for e in examples if e.id == "NYSEDREGENTS_2014_8_10")  # labels 1-4, answerKey "1"
    assert numeric.gold == 0


def test_openbookqa_uses_the_bare_stem(shared_data):
    examples = load(shared_data, "openbookqa", "openbookqa/test.jsonl")
    assert len(examples) == 500
    assert examples[0].contexts[0].startswith("A person wants to start saving money")
    assert examples[0].continuations[1] == " quit eating lunch out" and examples[0].gold == 1


def test_piqa_labels_come_from_the_aligned_file(shared_data):
    examples = load(shared_data, "piqa", "piqa/valid.jsonl", labels_path="piqa/valid-labels.lst")
    assert len(examples) == 1838
    assert [e.gold for e in examples[:3]] == [0, 1, 1]
    assert examples[0].contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"


def test_llm_foundry_multiple_choice(shared_data):
    copa = load(shared_data, "icl_mc", "copa/copa.jsonl")
    assert len(copa) == 100
    assert copa[0].contexts == ("The man turned on the faucet, therefore",) * 2
    assert copa[0].continuations == (" the toilet filled with water.", " water flowed from the spout.")
    assert copa[0].gold == 1
    boolq = load(shared_data, "icl_mc", "boolq/boolq.jsonl", continuation_delimiter="\nAnswer: ")
    assert len(boolq) == 3270 and boolq[0].continuations == ("\nAnswer: no", "\nAnswer: yes")
    csqa = load(shared_data, "icl_mc", "commonsense_qa/commonsense_qa.jsonl")
    assert len(csqa) == 1221 and csqa[0].continuations[0] == " A" and csqa[0].contexts[0].endswith("Answer:")


def test_winogrande_is_partial_scoring(shared_data):
    examples = load(shared_data, "winogrande", "winogrande/winogrande.jsonl")
    assert len(examples) == 1267
    first = examples[0]
    assert first.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria")
    assert first.continuations == (" always got the easier cases.",) * 2 and first.gold == 1


def test_lambada_splits_off_the_last_word(shared_data):
    examples = load(shared_data, "lambada", "lambada/lambada_test.jsonl")
    assert len(examples) == 5153
    assert examples[0].contexts[0].endswith("I don't care about") and examples[0].continuations == (" signs",)


def test_gsm8k_reference_is_the_final_number(shared_data):
    examples = load(shared_data, "gsm8k", "gsm8k/test.jsonl")
    assert len(examples) == 1319
    assert examples[0].answer == "18" and examples[0].contexts[0].startswith("Question: Janet")
    train = load(shared_data, "gsm8k", "gsm8k/train.jsonl.gz")  # gzip-compressed JSONL
    assert len(train) == 7473 and all(e.answer for e in train)


def test_held_out_text_formats(shared_data):
    wiki = load(shared_data, "text", "wikipedia_sample/wiki_demo.txt")
    assert len(wiki) == 30 and wiki[0].continuations[0].startswith("Anarchism is a political philosophy")
    c4 = load(shared_data, "text", "c4_sample/c4_demo.jsonl")
    assert len(c4) == 300 and c4[0].contexts == ("",)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_hellaswag_format_and_preprocessing(tmp_path):
    path = write_lines(tmp_path / "hellaswag.jsonl", [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "split": "val", "label": 3,
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
        {"ind": 9, "activity_label": "Home and Garden", "ctx": "[header] How to grow tomatoes [title] Choose a spot.",
         "label": "0", "endings": ["[step] Dig a  hole.", "Sing."]},
    ])
    first, second = load_task("hs", TaskSpec(format="hellaswag", path=str(path)), tmp_path).examples
    assert first.id == "24" and first.gold == 3
    assert first.contexts[0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert first.continuations[3] == " starts pulling up roofing on a roof."
    assert second.contexts[0] == "Home and Garden: How to grow tomatoes. Choose a spot."
    assert second.continuations == (" Dig a hole.", " Sing.") and second.gold == 0


def test_generic_multiple_choice_schema(tmp_path):
    write_lines(tmp_path / "mine.jsonl", [
        {"context": "2 + 2 =", "choices": ["3", "4", "5"], "gold": 1, "id": "sum"},
        "",
        {"context": "The sky is", "choices": ["blue", "green"], "gold": 0},
    ])
    task = load_task("mine", TaskSpec(format="mc_jsonl", path="mine.jsonl"), tmp_path)
    assert [e.id for e in task.examples] == ["sum", "3"]  # line numbers when no id
    assert task.examples[0].continuations == (" 3", " 4", " 5") and task.examples[0].gold == 1
    assert task.random_baseline() == pytest.approx((1 / 3 + 1 / 2) / 2)


GOOD = {
    "arc": {"id": "x", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"},
                                                            {"text": "b", "label": "B"}]}, "answerKey": "B"},
    "icl_mc": {"query": "Q", "choices": ["a", "b"], "gold": 0},
    "winogrande": {"context_options": ["x a", "x b"], "continuation": "c", "gold": 1},
    "hellaswag": {"activity_label": "A", "ctx": "c", "endings": ["a", "b"], "label": 1},
    "mc_jsonl": {"context": "c", "choices": ["a", "b"], "gold": 0},
    "lambada": {"text": "a b c"},
    "gsm8k": {"question": "q", "answer": "so\n#### 4"},
}


def _with(fmt: str, **changes) -> dict:
    record = json.loads(json.dumps(GOOD[fmt]))
    for key, value in changes.items():
        node = record
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return record


_DELETE = object()


@pytest.mark.parametrize("fmt, bad, field, expected", [
    ("arc", _with("arc", answerKey=_DELETE), "answerKey", "expected str, missing"),
    ("arc", _with("arc", answerKey="E"), "answerKey", "one of the choice labels"),
    ("arc", _with("arc", **{"question.choices": [{"text": "a"}]}), "question.choices[0]", "'label'"),
    ("arc", _with("arc", **{"question.stem": 7}), "question.stem", "expected str, got 7"),
    ("icl_mc", _with("icl_mc", gold=2), "gold", "an index in 0..1"),
    ("icl_mc", _with("icl_mc", gold=True), "gold", "an integer"),
    ("icl_mc", _with("icl_mc", choices=["a", 3]), "choices", "list of at least 2 strings"),
    ("winogrande", _with("winogrande", continuation=5), "continuation", "expected str"),
    ("hellaswag", _with("hellaswag", endings="abc"), "endings", "list of at least 2 strings"),
    ("hellaswag", _with("hellaswag", label="x"), "label", "integer"),
    ("mc_jsonl", _with("mc_jsonl", context=_DELETE), "context", "missing"),
    ("lambada", _with("lambada", text="single"), "text", "several words"),
    ("gsm8k", _with("gsm8k", answer="no marker"), "answer", "#### <number>"),
])
def test_malformed_record_names_file_line_and_field(tmp_path, fmt, bad, field, expected):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD[fmt], bad])
    with pytest.raises(TaskFormatError) as info:
        load_task("bad", TaskSpec(format=fmt, path=str(path)), tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: field '{field}'"), message
    assert expected in message


def test_invalid_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD["mc_jsonl"], GOOD["mc_jsonl"], '{"context": "c", '])
    with pytest.raises(TaskFormatError, match=rf"^{path}:3: not valid JSON"):
        load_task("bad", TaskSpec(format="mc_jsonl", path=str(path)), tmp_path)


def test_piqa_label_errors_name_the_labels_file(tmp_path):
    data = write_lines(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    labels = tmp_path / "labels.lst"
    labels.write_text("0\n2\n")
    with pytest.raises(TaskFormatError, match=rf"^{labels}:2: label: expected 0 or 1"):
        load_task("p", TaskSpec(format="piqa", path=str(data), labels_path=str(labels)), tmp_path)
    labels.write_text("0\n")
    with pytest.raises(TaskFormatError, match="1 labels for 2 records"):
        load_task("p", TaskSpec(format="piqa", path=str(data), labels_path=str(labels)), tmp_path)


def test_missing_task_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_task("x", TaskSpec(format="mc_jsonl", path="nowhere.jsonl"), tmp_path)


def test_limit_and_fewshot_pool(shared_data):
    spec = TaskSpec(format="arc", path="arc/ARC-Easy-Dev.jsonl", fewshot_path="arc/ARC-Easy-Train.jsonl",
                    num_fewshot=5)
    task = load_task("arc", spec, shared_data, limit=10)
    assert len(task.examples) == 10 and len(task.fewshot_pool) == 2251 and not task.fewshot_from_self


# --- the shipped declarations ------------------------------------------------------------------

def shipped(name: str, **overrides) -> EvalConfig:
    raw = config_lib.apply_overrides(config_lib.read_yaml(CONFIGS / name), [f"{k}={v}" for k, v in overrides.items()])
    return config_lib.from_dict(EvalConfig, raw)


def test_core_suite_declares_every_shipped_dataset_and_its_files_exist(shared_data):
    cfg = shipped("core.yaml", data_dir=str(shared_data))
    assert set(cfg.selected_tasks()) == {"arc_easy", "arc_challenge", "openbookqa", "piqa", "boolq", "copa",
                                         "commonsense_qa", "winogrande", "lambada_openai", "gsm8k",
                                         "bpb_wikipedia", "bpb_c4"}
    files = cfg.inputs()
    assert files["checkpoint.base"] == "{run_dir}/pretrain/output/model"  # substituted by the stage runner
    for name, path in files.items():
        if name.startswith("task."):
            assert Path(path).is_file(), f"{name}: {path}"
    tasks = cfg.load_tasks()
    assert {t.name: t.kind for t in tasks}["gsm8k"] == "generate"


def test_tiny_suite_is_a_limited_subset(shared_data):
    cfg = shipped("tiny.yaml", data_dir=str(shared_data))
    assert cfg.limit == 50 and cfg.task_specs["gsm8k"].max_new_tokens == 64
    assert all(len(t.examples) <= 50 for t in cfg.load_tasks())


def test_tasks_may_be_given_comma_separated():
    assert shipped("core.yaml", tasks="arc_easy,piqa").selected_tasks() == ["arc_easy", "piqa"]
    assert shipped("core.yaml", tasks="[copa]").selected_tasks() == ["copa"]


def test_fewshot_override_adds_the_demonstration_files_to_the_lineage(shared_data):
    cfg = shipped("core.yaml", data_dir=str(shared_data), num_fewshot=3)
    assert cfg.inputs()["task.arc_easy.fewshot"].endswith("ARC-Easy-Train.jsonl")
    assert "task.arc_easy.fewshot" not in shipped("core.yaml").inputs()


@pytest.mark.parametrize("overrides, message", [
    ({"tasks": "[arc_esay]"}, "tasks ['arc_esay'] are not declared"),
    ({"chat_models": "[sft]"}, "chat_models ['sft'] are not names in checkpoints"),
    ({"task_specs.piqa.labels_path": "null"}, "piqa task needs labels_path"),
    ({"task_specs.arc_easy.format": "arcc"}, "is not one of"),
])
def test_config_errors(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        shipped("core.yaml", **overrides)

"""Benchmark tasks: declared in YAML, loaded from local files into one uniform example shape.

Design choices:

* A task is data, not code: a :class:`TaskSpec` (``format`` + ``path`` + a few knobs) under
  ``task_specs:`` in an eval config. ``configs/eval/tasks/<family>.yaml`` declares the shipped
  families and stage configs ``include:`` them, so adding a task in one of the known formats
  (including the generic multiple-choice schema ``{"context", "choices", "gold"}``) needs no code.
* Every format becomes the same :class:`Example`: one ``(context, continuation)`` pair per
  choice and the index of the gold one. Ordinary multiple choice repeats the context;
  Winogrande-style *partial scoring* repeats the continuation instead; LAMBADA, GSM8K and
  held-out text are one-pair examples. Scoring (``scoring.py``) and prompting (``prompts.py``)
  therefore never look at formats, and ``contexts[gold] + continuations[gold]`` is a solved
  example, which is what a few-shot prefix is made of.
* Prompts follow lm-evaluation-harness's defaults for each dataset (``"Question: …\\nAnswer:"``
  for ARC/PIQA, the bare stem for OpenBookQA, the HellaSwag preprocessing, LAMBADA split at the
  last space) and LLM-Foundry's for its ICL files (``query`` + delimiter + choice).
* Four kinds of task, fixed by the format: ``multiple_choice`` (acc, acc_norm), ``last_word``
  (LAMBADA: acc, perplexity), ``generate`` (GSM8K: exact match of the final number) and
  ``bits_per_byte`` (held-out text).
* ``format: lm_eval_yaml`` runs an lm-evaluation-harness task YAML on local files
  (:mod:`llmray.eval.lm_eval_tasks`); its kind comes from the YAML's ``output_type``.
* Every multiple-choice example keeps its answer texts as written (``choice_texts``, what
  lm-evaluation-harness's ``doc_to_choice`` returns): their character counts are the acc_norm
  denominators, so acc_norm is lm-evaluation-harness's.
* A bad record fails loudly: :class:`TaskFormatError` names the file, the line and the field,
  and what was expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from llmray import jsonl
from llmray.config import param

Kind = Literal["multiple_choice", "last_word", "generate", "bits_per_byte"]
Format = Literal["arc", "openbookqa", "piqa", "icl_mc", "winogrande", "hellaswag", "mc_jsonl",
                 "lambada", "gsm8k", "text", "lm_eval_yaml"]


class TaskFormatError(ValueError):
    """A task file does not match its declared format; the message names file, line and field."""


@dataclass
class TaskSpec:
    """One benchmark task: where its examples are and how to read and score them."""

    format: Format = param("mc_jsonl", doc="file format: arc | openbookqa (AI2 JSONL), piqa (+ labels_path), "
                                           "icl_mc (LLM-Foundry query/choices/gold), winogrande (LLM-Foundry "
                                           "context_options/continuation/gold), hellaswag, mc_jsonl "
                                           "(context/choices/gold), lambada, gsm8k, text (held-out text "
                                           "for bits-per-byte: .txt one document per line, or JSONL 'text'), "
                                           "lm_eval_yaml (an lm-evaluation-harness task YAML on local files; "
                                           "its prompts, delimiters, shots and generation settings come from "
                                           "the YAML)")
    path: str = param("", doc="examples file (or the lm-eval task YAML); relative paths are resolved "
                              "against data_dir")
    labels_path: str | None = param(None, doc="label file, one integer per line (piqa)")
    fewshot_path: str | None = param(None, doc="file (same format) to draw few-shot examples from; "
                                               "null = the examples file itself, never the example itself")
    num_fewshot: int | None = param(None, doc="solved examples put before each question; null = 0, or an "
                                              "lm-eval YAML's own num_fewshot", min=0)
    continuation_delimiter: str = param(" ", doc="between context and answer (icl_mc, winogrande, mc_jsonl)")
    fewshot_delimiter: str = param("\n\n", doc="between few-shot examples and the question")
    random_baseline: float | None = param(
        None, doc="chance-level score for the CORE centering; null = mean of 1/num_choices for multiple "
                  "choice, 0 otherwise", min=0.0, max=0.99)
    core: bool = param(True, doc="include this task in the CORE aggregate (not for bits_per_byte)")
    core_metric: str = param("acc", doc="metric the CORE aggregate uses (acc, acc_norm or exact_match)")
    max_new_tokens: int = param(256, doc="generation budget (generate tasks)", min=1)
    stop: list[str] = param(default_factory=lambda: ["\n\n", "Question:"],
                            doc="generation stops at the first of these strings (generate tasks)")

    def __post_init__(self) -> None:
        if self.format == "piqa" and not self.labels_path:
            raise ValueError("a piqa task needs labels_path (valid-labels.lst)")

    @property
    def kind(self) -> Kind | None:
        """The kind fixed by the format (None for lm_eval_yaml: its YAML's output_type decides)."""
        return KIND_OF_FORMAT.get(self.format)


@dataclass(frozen=True)
class Example:
    """One item: a (context, continuation) pair per choice, and which choice is right.

    ``answer`` is the reference string of a ``generate`` task (e.g. GSM8K's final number).
    ``choice_texts`` are the answers as written, without delimiters (lm-evaluation-harness's
    ``doc_to_choice``); acc_norm divides by their character counts. Empty: the continuations.
    ``demonstration`` is the text the example contributes as a few-shot demonstration when it is
    not ``contexts[gold] + continuations[gold]`` (an lm-eval ``loglikelihood`` task scores its
    target without the delimiter its demonstrations have). ``description`` goes before the
    demonstrations and the question (an lm-eval task's ``description``).
    """

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int = 0
    answer: str | None = None
    choice_texts: tuple[str, ...] = ()
    demonstration: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations) or not self.contexts:
            raise ValueError(f"example {self.id}: {len(self.contexts)} contexts for "
                             f"{len(self.continuations)} continuations")
        if not 0 <= self.gold < len(self.contexts):
            raise ValueError(f"example {self.id}: gold {self.gold} outside 0..{len(self.contexts) - 1}")
        if self.choice_texts and len(self.choice_texts) != len(self.contexts):
            raise ValueError(f"example {self.id}: {len(self.choice_texts)} choice texts for "
                             f"{len(self.contexts)} choices")

    @property
    def num_choices(self) -> int:
        return len(self.contexts)

    def norm_lengths(self) -> list[int]:
        """acc_norm's denominators: characters of each answer as written."""
        return [len(text) for text in (self.choice_texts or self.continuations)]

    def solved(self) -> str:
        """The example with its right answer: a few-shot demonstration."""
        if self.demonstration is not None:
            return self.demonstration
        return self.contexts[self.gold] + self.continuations[self.gold]


def multiple_choice(id: str, context: str, choices: list[str], gold: int, delimiter: str) -> Example:
    return Example(id, (context,) * len(choices), tuple(delimiter + c for c in choices), gold,
                   choice_texts=tuple(choices))


@dataclass
class Task:
    """A loaded task: its examples, where demonstrations come from, and how it is scored.

    ``kind`` defaults to the spec's format's; ``total`` counts the examples before ``limit``;
    ``answer_of`` turns a ``generate`` completion into the string compared with the reference
    (None: GSM8K's final number); ``config`` and ``version`` describe the task in
    lm-evaluation-harness's terms (:mod:`llmray.eval.lm_eval_results`).
    """

    name: str
    spec: TaskSpec
    examples: list[Example]
    fewshot_pool: list[Example]
    fewshot_from_self: bool  # pool is the examples file: skip the example itself when sampling
    kind: Kind | None = None
    total: int | None = None
    answer_of: Callable[[str], str] | None = None
    config: dict | None = None
    version: float | str | None = None

    def __post_init__(self) -> None:
        self.kind = self.kind or self.spec.kind
        if self.kind is None:
            raise ValueError(f"task {self.name}: format {self.spec.format} needs an explicit kind")
        if self.total is None:
            self.total = len(self.examples)

    def random_baseline(self) -> float:
        if self.spec.random_baseline is not None:
            return self.spec.random_baseline
        if self.kind != "multiple_choice" or not self.examples:
            return 0.0
        return sum(1 / e.num_choices for e in self.examples) / len(self.examples)


# ---------------------------------------------------------------------------------------------
# Reading records with errors that point at file, line and field
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    path: Path
    line: int
    data: dict

    def error(self, field: str, expected: str, got: Any = None) -> TaskFormatError:
        seen = "missing" if got is _MISSING else f"got {json.dumps(got)[:80]}"
        return TaskFormatError(f"{self.path}:{self.line}: field '{field}': expected {expected}, {seen}")

    def get(self, field: str, kind: type | tuple[type, ...], expected: str | None = None) -> Any:
        """The value at dotted ``field`` (``question.stem``), checked to be of ``kind``."""
        value: Any = self.data
        for part in field.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        name = expected or (kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind))
        if value is _MISSING or not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise self.error(field, name, value)
        return value

    def strings(self, field: str, min_items: int = 1) -> list[str]:
        values = self.get(field, list, f"a list of at least {min_items} strings")
        if len(values) < min_items or not all(isinstance(v, str) for v in values):
            raise self.error(field, f"a list of at least {min_items} strings", values)
        return values

    def index(self, field: str, num_choices: int) -> int:
        value = self.get(field, int, "an integer")
        if not 0 <= value < num_choices:
            raise self.error(field, f"an index in 0..{num_choices - 1}", value)
        return value


_MISSING = object()


def _open_text(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[Record]:
    """Records of a JSONL(.gz) file (:func:`llmray.jsonl.read_lines`); blank lines are skipped, a
    bad line raises naming file and 1-based line number."""
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    for line in jsonl.read_lines(path):
        if isinstance(line.record, jsonl.BadLine):
            raise TaskFormatError(str(line.record))
        yield Record(path, line.number, line.record)


# ---------------------------------------------------------------------------------------------
# One loader per format: records -> examples
# ---------------------------------------------------------------------------------------------

def _ai2(record: Record, prompt: str) -> Example:
    """ARC / OpenBookQA: ``question.stem``, ``question.choices[{text, label}]``, ``answerKey``."""
    stem = record.get("question.stem", str)
    choices = record.get("question.choices", list, "a list of {text, label} objects")
    texts, labels = [], []
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str) \
                or not isinstance(choice.get("label"), str):
            raise record.error(f"question.choices[{i}]", "an object with string 'text' and 'label'", choice)
        texts.append(choice["text"])
        labels.append(choice["label"])
    answer = record.get("answerKey", str)
    if answer not in labels:
        raise record.error("answerKey", f"one of the choice labels {labels}", answer)
    return multiple_choice(str(record.data.get("id", record.line)), prompt.format(question=stem), texts,
                           labels.index(answer), " ")


def _arc(record: Record, spec: TaskSpec) -> Example:
    return _ai2(record, "Question: {question}\nAnswer:")


def _openbookqa(record: Record, spec: TaskSpec) -> Example:
    return _ai2(record, "{question}")


def _piqa(record: Record, spec: TaskSpec, label: int) -> Example:
    goal = record.get("goal", str)
    solutions = [record.get("sol1", str), record.get("sol2", str)]
    return multiple_choice(str(record.line), f"Question: {goal}\nAnswer:", solutions, label, " ")


def _icl_mc(record: Record, spec: TaskSpec) -> Example:
    """LLM-Foundry multiple choice (BoolQ, COPA, CommonsenseQA): ``query``, ``choices``, ``gold``."""
    choices = record.strings("choices", 2)
    return multiple_choice(str(record.line), record.get("query", str), choices,
                           record.index("gold", len(choices)), spec.continuation_delimiter)


def _mc_jsonl(record: Record, spec: TaskSpec) -> Example:
    """The generic schema users write: ``context``, ``choices``, ``gold`` (optional ``id``)."""
    choices = record.strings("choices", 2)
    return multiple_choice(str(record.data.get("id", record.line)), record.get("context", str), choices,
                           record.index("gold", len(choices)), spec.continuation_delimiter)


def _winogrande(record: Record, spec: TaskSpec) -> Example:
    """Partial scoring: the options differ in the context; the shared continuation is scored.

    The choices are the context options (as lm-evaluation-harness's Winogrande ``doc_to_choice``)."""
    contexts = record.strings("context_options", 2)
    continuation = spec.continuation_delimiter + record.get("continuation", str)
    return Example(str(record.line), tuple(contexts), (continuation,) * len(contexts),
                   record.index("gold", len(contexts)), choice_texts=tuple(contexts))


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing of WikiHow artefacts, then a strip (a removed
    leading ``[step]`` would otherwise leave a space before the delimiter's)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def _hellaswag(record: Record, spec: TaskSpec) -> Example:
    """HellaSwag JSONL: ``ctx``, ``endings``, ``label``, ``activity_label``."""
    endings = record.strings("endings", 2)
    label = record.get("label", (int, str), "an integer (or a digit string)")
    if isinstance(label, str):
        if not label.isdigit():
            raise record.error("label", "an integer (or a digit string)", label)
        label = int(label)
    if not 0 <= label < len(endings):
        raise record.error("label", f"an index in 0..{len(endings) - 1}", label)
    context = _hellaswag_clean(record.get("activity_label", str) + ": " + record.get("ctx", str))
    return multiple_choice(str(record.data.get("ind", record.line)), context,
                           [_hellaswag_clean(e) for e in endings], label, " ")


def _lambada(record: Record, spec: TaskSpec) -> Example:
    """Last-word prediction: context is the passage up to the last space, the target the last word."""
    text = record.get("text", str)
    if " " not in text.strip():
        raise record.error("text", "a passage of several words", text)
    context, word = text.rsplit(" ", 1)
    return Example(str(record.line), (context,), (" " + word,))


_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$")


def _gsm8k(record: Record, spec: TaskSpec) -> Example:
    """Generative: the model writes a solution; the number after ``####`` is the reference."""
    question = record.get("question", str)
    solution = record.get("answer", str)
    match = _GSM8K_ANSWER.search(solution)
    if match is None:
        raise record.error("answer", "a solution ending in '#### <number>'", solution[-60:])
    return Example(str(record.line), (f"Question: {question}\nAnswer:",), (" " + solution,),
                   answer=normalize_number(match.group(1)))


def normalize_number(text: str) -> str:
    """'$1,234.50' -> '1234.5': the comparison form of a numeric answer."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def _text_documents(path: Path) -> Iterator[Example]:
    """Held-out text: a .txt file (one document per non-empty line) or JSONL with a 'text' field."""
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        for record in read_jsonl(path):
            yield Example(str(record.line), ("",), (record.get("text", str),))
        return
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield Example(str(number), ("",), (line.rstrip("\n"),))


RecordLoader = Callable[[Record, TaskSpec], Example]
_RECORD_LOADERS: dict[str, RecordLoader] = {
    "arc": _arc, "openbookqa": _openbookqa, "icl_mc": _icl_mc, "winogrande": _winogrande,
    "hellaswag": _hellaswag, "mc_jsonl": _mc_jsonl, "lambada": _lambada, "gsm8k": _gsm8k,
}

KIND_OF_FORMAT: dict[str, Kind] = {
    **{name: "multiple_choice" for name in ("arc", "openbookqa", "piqa", "icl_mc", "winogrande",
                                            "hellaswag", "mc_jsonl")},
    "lambada": "last_word", "gsm8k": "generate", "text": "bits_per_byte",
}


def read_examples(path: Path, spec: TaskSpec, labels_path: Path | None = None) -> list[Example]:
    """Every example of ``path`` in ``spec.format``."""
    if spec.format == "text":
        return list(_text_documents(path))
    if spec.format == "piqa":
        return _read_piqa(path, labels_path, spec)
    loader = _RECORD_LOADERS[spec.format]
    return [loader(record, spec) for record in read_jsonl(path)]


def _read_piqa(path: Path, labels_path: Path | None, spec: TaskSpec) -> list[Example]:
    if labels_path is None:
        raise TaskFormatError(f"{path}: a piqa task needs labels_path")
    with _open_text(labels_path) as handle:
        labels = [line.strip() for line in handle if line.strip()]
    records = list(read_jsonl(path))
    if len(labels) != len(records):
        raise TaskFormatError(f"{labels_path}: {len(labels)} labels for {len(records)} records in {path}")
    examples = []
    for number, (label, record) in enumerate(zip(labels, records), start=1):
        if label not in ("0", "1"):
            raise TaskFormatError(f"{labels_path}:{number}: label: expected 0 or 1, got {label!r}")
        examples.append(_piqa(record, spec, int(label)))
    return examples


def resolve_path(path: str, data_dir: str | Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else Path(data_dir) / candidate


def task_files(spec: TaskSpec, data_dir: str | Path) -> dict[str, Path]:
    """The files a task reads (the lineage inputs of an eval run)."""
    if spec.format == "lm_eval_yaml":
        from llmray.eval import lm_eval_tasks

        return lm_eval_tasks.task_files(resolve_path(spec.path, data_dir))
    files = {"examples": resolve_path(spec.path, data_dir)}
    if spec.labels_path:
        files["labels"] = resolve_path(spec.labels_path, data_dir)
    if spec.fewshot_path and spec.num_fewshot:
        files["fewshot"] = resolve_path(spec.fewshot_path, data_dir)
    return files


def with_fewshot(spec: TaskSpec, num_fewshot: int | None) -> TaskSpec:
    """``spec`` with its ``num_fewshot`` overridden (``None`` keeps it)."""
    return spec if num_fewshot is None else dataclasses.replace(spec, num_fewshot=num_fewshot)


def load_task(name: str, spec: TaskSpec, data_dir: str | Path, limit: int | None = None,
              num_fewshot: int | None = None) -> Task:
    """Read task ``name``; ``limit`` keeps the first examples, ``num_fewshot`` overrides the spec's."""
    if not spec.path:
        raise TaskFormatError(f"task {name}: no path given")
    spec = with_fewshot(spec, num_fewshot)
    if spec.format == "lm_eval_yaml":
        from llmray.eval import lm_eval_tasks

        return lm_eval_tasks.load_task(name, spec, resolve_path(spec.path, data_dir), limit)
    if spec.num_fewshot is None:
        spec = dataclasses.replace(spec, num_fewshot=0)
    if spec.kind == "bits_per_byte" and spec.num_fewshot:
        raise TaskFormatError(f"task {name}: bits-per-byte on held-out text takes no few-shot examples")
    files = task_files(spec, data_dir)
    examples = read_examples(files["examples"], spec, files.get("labels"))
    if not examples:
        raise TaskFormatError(f"task {name}: {files['examples']} holds no examples")
    pool, from_self = examples, True
    if "fewshot" in files:
        pool, from_self = read_examples(files["fewshot"], spec, None), False
    check_fewshot_pool(name, spec.num_fewshot, pool, from_self)
    return Task(name, spec, examples[:limit], pool, from_self, total=len(examples),
                config=builtin_config(name, spec, files))


def check_fewshot_pool(name: str, num_fewshot: int, pool: list[Example], from_self: bool) -> None:
    if num_fewshot and len(pool) < num_fewshot + from_self:
        raise TaskFormatError(f"task {name}: {num_fewshot}-shot needs more than the {len(pool)} "
                              f"examples available to draw demonstrations from")


_OUTPUT_TYPE = {"multiple_choice": "multiple_choice", "last_word": "loglikelihood",
                "generate": "generate_until", "bits_per_byte": "loglikelihood_rolling"}


def builtin_config(name: str, spec: TaskSpec, files: dict[str, Path]) -> dict:
    """A built-in task described with lm-evaluation-harness's config keys (for its results file)."""
    config = {"task": name, "dataset_path": str(files["examples"]), "output_type": _OUTPUT_TYPE[spec.kind],
              "num_fewshot": spec.num_fewshot, "target_delimiter": spec.continuation_delimiter,
              "fewshot_delimiter": spec.fewshot_delimiter,
              "metadata": {"llmray_format": spec.format, "files": {k: str(v) for k, v in files.items()}}}
    if spec.kind == "generate":
        config["generation_kwargs"] = {"until": list(spec.stop), "max_gen_toks": spec.max_new_tokens,
                                       "do_sample": False}
    return config

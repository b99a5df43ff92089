"""lm-evaluation-harness task YAMLs, run on local files: ``task_specs.<name>: {format: lm_eval_yaml, path: ...}``.

Design choices:

* The common subset of lm-eval's task config is honoured, and every field outside it that would
  change prompts or scores (``process_docs``, ``filter_list``, ``!function`` code, ...) is refused
  by name: a task silently scored differently from lm-eval would be worse than one that fails.
  Purely descriptive fields (``tag``, ``metadata``, decontamination keys) are accepted.
* Data: ``dataset_path: json`` (JSON Lines, or a JSON array of objects) or ``parquet``, with
  ``dataset_kwargs.data_files`` as a file, a list, or ``{split: file(s)}`` (a bare file or list
  is split ``train``, as in ``datasets.load_dataset``). Relative data files are resolved against
  the YAML's folder, so a task folder is self-contained. Nothing is fetched: Hub datasets are refused.
* Splits as lm-eval picks them: evaluate ``test_split``, else ``validation_split``; demonstrations
  from ``fewshot_split``, else ``training_split``, else ``validation_split``, else ``test_split``
  (never the evaluated example itself). ``include:`` files (relative to the YAML) are merged
  under the including file's own keys.
* ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``: a string naming a field of the
  document reads it, any other string is a Jinja template (a rendered ``doc_to_choice`` is a
  Python list literal, a rendered all-digit target of a task with choices is an index), an
  integer target is an index, a YAML list of choices is used as is. Templates render in jinja2's
  ``ImmutableSandboxedEnvironment`` (task files are user data: no access to Python internals, no
  mutation), with lm-eval's settings: strict undefined variables, trailing newlines kept, and a
  ``regex_replace`` filter.
* Prompts are lm-eval's: ``description`` + demonstrations (``text + target_delimiter + answer +
  fewshot_delimiter`` each) + ``text``; a ``multiple_choice`` continuation is ``target_delimiter +
  choice`` (acc_norm divides by the choice's characters), a ``loglikelihood`` continuation is the
  rendered target as is, ``generate_until`` stops at ``generation_kwargs.until`` after at most
  ``max_gen_toks`` tokens (greedy) and scores ``exact_match`` with the metric's ``ignore_case`` /
  ``ignore_punctuation`` / ``ignore_numbers`` / ``regexes_to_ignore``. Zero-shot prompts are
  therefore identical to lm-eval's; few-shot demonstrations are drawn by llmray's seeded
  per-example sampler (:func:`llmray.eval.prompts.fewshot_examples`), not lm-eval's.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import logging
import re
import string
from pathlib import Path
from typing import Any, Callable

import yaml

from llmray.eval.tasks import (Example, Kind, Record, Task, TaskFormatError, TaskSpec, check_fewshot_pool,
                               multiple_choice, read_jsonl)

log = logging.getLogger("llmray.eval")

KIND_OF_OUTPUT_TYPE: dict[str, Kind] = {"multiple_choice": "multiple_choice", "loglikelihood": "last_word",
                                        "generate_until": "generate", "loglikelihood_rolling": "bits_per_byte"}
# lm-eval's metric names per output type that llmray computes (the rest of a metric_list is skipped)
COMPUTED_METRICS = {"multiple_choice": {"acc", "acc_norm"}, "loglikelihood": {"acc", "perplexity"},
                    "generate_until": {"exact_match"}, "loglikelihood_rolling": {"bits_per_byte"}}
ACCEPTED_FIELDS = {"task", "task_alias", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
                   "validation_split", "test_split", "fewshot_split", "doc_to_text", "doc_to_target",
                   "doc_to_choice", "description", "target_delimiter", "fewshot_delimiter", "num_fewshot",
                   "metric_list", "output_type", "generation_kwargs", "repeats", "should_decontaminate",
                   "doc_to_decontamination_query", "metadata", "unsafe_code"}
REFUSED_FIELDS = {"process_docs", "process_results", "filter_list", "use_prompt", "doc_to_image", "doc_to_audio",
                  "custom_dataset", "gen_prefix", "fewshot_config", "group", "task_list"}
EXACT_MATCH_OPTIONS = {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"}


# ---------------------------------------------------------------------------------------------
# The YAML: includes merged, Python hooks refused
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Function:
    """A ``!function module.name`` tag: Python code, which llmray does not run."""

    name: str


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


def read_config(path: Path) -> tuple[dict, list[Path]]:
    """The task config of ``path`` with its ``include:`` files merged under it, and every YAML file read."""
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        raw = yaml.load(handle, Loader=_Loader)
    if not isinstance(raw, dict):
        raise TaskFormatError(f"{path}: expected a mapping of lm-eval task fields, got {type(raw).__name__}")
    includes = raw.pop("include", None) or []
    config: dict = {}
    files = [path]
    for include in [includes] if isinstance(includes, str) else includes:
        included, read = read_config((path.parent / include).resolve())
        config.update(included)
        files += read
    config.update(raw)
    _refuse_code(path, config)
    return config, files


def _refuse_code(path: Path, value: Any, field: str = "") -> None:
    if isinstance(value, _Function):
        raise TaskFormatError(f"{path}: field '{field}' is Python code (!function {value.name}), which llmray "
                              f"does not run; write it as a Jinja template or a field name")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _refuse_code(path, item, f"{field}.{key}" if field else str(key))


def _check_fields(path: Path, config: dict) -> None:
    for field in config:
        if field in REFUSED_FIELDS:
            raise TaskFormatError(f"{path}: field '{field}' is not supported by llmray's lm-eval task reader "
                                  f"(supported: {', '.join(sorted(ACCEPTED_FIELDS))})")
        if field not in ACCEPTED_FIELDS:
            raise TaskFormatError(f"{path}: field '{field}' is not an lm-eval task field")
    if config.get("output_type", "generate_until") not in KIND_OF_OUTPUT_TYPE:
        raise TaskFormatError(f"{path}: field 'output_type': expected one of {sorted(KIND_OF_OUTPUT_TYPE)}, "
                              f"got {config['output_type']!r}")
    if config.get("repeats", 1) != 1:
        raise TaskFormatError(f"{path}: field 'repeats': only 1 is supported, got {config['repeats']!r}")
    if config.get("unsafe_code"):
        raise TaskFormatError(f"{path}: field 'unsafe_code': tasks that execute model output are not supported")


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------

def split_files(path: Path, config: dict) -> dict[str, list[Path]]:
    """``{split: [files]}`` from ``dataset_kwargs.data_files``, resolved against the YAML's folder."""
    if config.get("dataset_path") not in ("json", "parquet"):
        raise TaskFormatError(f"{path}: field 'dataset_path': expected json or parquet (local files given in "
                              f"dataset_kwargs.data_files), got {config.get('dataset_path')!r}")
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) != {"data_files"}:
        raise TaskFormatError(f"{path}: field 'dataset_kwargs': expected exactly {{data_files: ...}}, got "
                              f"{json.dumps(kwargs)[:80]}")
    data_files = kwargs["data_files"]
    if isinstance(data_files, (str, list)):
        data_files = {"train": data_files}
    if not isinstance(data_files, dict):
        raise TaskFormatError(f"{path}: field 'dataset_kwargs.data_files': expected a file, a list of files "
                              f"or a mapping split -> file(s)")
    resolved = {}
    for split, files in data_files.items():
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise TaskFormatError(f"{path}: field 'dataset_kwargs.data_files.{split}': expected a file or a "
                                  f"non-empty list of files")
        resolved[str(split)] = [(path.parent / Path(f).expanduser()).resolve() for f in files]
    return resolved


def _read_documents(files: list[Path], dataset_path: str) -> list[Record]:
    records = []
    for file in files:
        if dataset_path == "parquet":
            import pyarrow.parquet as pq

            records += [Record(file, row, data) for row, data in enumerate(pq.read_table(file).to_pylist(), 1)]
        elif _is_json_array(file):
            data = json.loads(file.read_text(encoding="utf-8"))
            for row, item in enumerate(data, 1):
                if not isinstance(item, dict):
                    raise TaskFormatError(f"{file}: item {row}: expected an object, got {type(item).__name__}")
                records.append(Record(file, row, item))
        else:
            records += list(read_jsonl(file))
    return records


def _is_json_array(file: Path) -> bool:
    if not file.is_file():
        raise FileNotFoundError(f"task data file {file} does not exist")
    if file.suffix != ".json":
        return False
    with open(file, encoding="utf-8") as handle:
        head = handle.read(64).lstrip()
    return head.startswith("[")


def task_files(path: Path) -> dict[str, Path]:
    """The YAML files and data files a task reads (the lineage inputs of an eval run)."""
    config, yamls = read_config(path)
    files = {f"yaml.{i}" if i else "yaml": file for i, file in enumerate(yamls)}
    for split, paths in split_files(path, config).items():
        files.update({f"data.{split}.{i}": file for i, file in enumerate(paths)})
    return files


# ---------------------------------------------------------------------------------------------
# Documents -> examples
# ---------------------------------------------------------------------------------------------

def _regex_replace(text: str, pattern: str, replacement: str, count: int = 0) -> str:
    return re.sub(pattern, replacement, text, count=count)


@functools.lru_cache(maxsize=1)
def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = _regex_replace
    return env


class DocumentReader:
    """Applies one task config's ``doc_to_*`` fields to documents, as lm-eval does."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config
        self.output_type = config.get("output_type", "generate_until")
        self.target_delimiter = config.get("target_delimiter", " ")
        self._templates: dict[str, Any] = {}

    def render(self, record: Record, field: str) -> Any:
        """The value of ``field`` for this document: a document field, a rendered template, or the YAML value."""
        spec = self.config.get(field)
        if spec is None:
            raise TaskFormatError(f"{self.path}: field '{field}' is required for output_type {self.output_type}")
        if not isinstance(spec, str):
            return spec
        if spec in record.data:
            return record.data[spec]
        if spec not in self._templates:
            try:
                self._templates[spec] = _environment().from_string(spec)
            except Exception as error:  # a template syntax error, named with its field
                raise TaskFormatError(f"{self.path}: field '{field}': not a valid Jinja template: {error}") from None
        try:
            return self._templates[spec].render(**record.data)
        except Exception as error:  # undefined variable, sandbox refusal, ...
            raise TaskFormatError(f"{self.path}: field '{field}' on {record.path}:{record.line}: "
                                  f"{type(error).__name__}: {error}") from None

    def text(self, record: Record) -> str:
        text = self.render(record, "doc_to_text")
        if not isinstance(text, str) or (text.isdigit() and "doc_to_choice" in self.config):
            raise TaskFormatError(f"{self.path}: field 'doc_to_text' on {record.path}:{record.line} gave "
                                  f"{text!r}: an index (lm-eval's multiple-input tasks) is not supported; "
                                  f"expected the prompt text")
        return text

    def choices(self, record: Record) -> list[str]:
        value = self.render(record, "doc_to_choice")
        spec = self.config["doc_to_choice"]
        if isinstance(value, str) and isinstance(spec, str) and spec not in record.data:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise TaskFormatError(f"{self.path}: field 'doc_to_choice' on {record.path}:{record.line} "
                                      f"rendered {value[:80]!r}, not a list literal") from None
        if isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise TaskFormatError(f"{self.path}: field 'doc_to_choice' on {record.path}:{record.line}: expected "
                                  f"a non-empty list of strings, got {json.dumps(value)[:80]}")
        return value

    def target(self, record: Record) -> int | str:
        value = self.render(record, "doc_to_target")
        if isinstance(value, str) and value.isdigit() and "doc_to_choice" in self.config:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TaskFormatError(f"{self.path}: field 'doc_to_target' on {record.path}:{record.line}: expected "
                                  f"an index or a string, got {json.dumps(value)[:80]} (several targets per "
                                  f"document are not supported)")
        return value

    def gold_index(self, record: Record, choices: list[str]) -> int:
        target = self.target(record)
        index = target if isinstance(target, int) else choices.index(target) if target in choices else -1
        if not 0 <= index < len(choices):
            raise TaskFormatError(f"{self.path}: field 'doc_to_target' on {record.path}:{record.line}: "
                                  f"{target!r} is not a choice index or one of the choices {choices}")
        return index

    def example(self, index: int, record: Record) -> Example:
        text = self.text(record)
        description = self.render(record, "description") if self.config.get("description") else ""
        if self.output_type == "multiple_choice":
            choices = self.choices(record)
            example = multiple_choice(str(index), text, choices, self.gold_index(record, choices),
                                      self.target_delimiter)
            return dataclasses.replace(example, description=description)
        target = self.target(record)
        if isinstance(target, int):
            target = self.choices(record)[target] if "doc_to_choice" in self.config else str(target)
        if self.output_type == "loglikelihood":
            return Example(str(index), (text,), (target,), description=description,
                           demonstration=text + self.target_delimiter + target)
        if self.output_type == "loglikelihood_rolling":
            return Example(str(index), ("",), (target,))
        return Example(str(index), (text,), (self.target_delimiter + target,), answer=target,
                       description=description)


def exact_match_normalizer(path: Path, config: dict) -> Callable[[str], str]:
    """The string transformation lm-eval's ``exact_match`` applies to prediction and reference alike."""
    options: dict = {}
    for entry in config.get("metric_list") or []:
        if isinstance(entry, dict) and entry.get("metric") == "exact_match":
            options = {k: v for k, v in entry.items() if k in EXACT_MATCH_OPTIONS}
    return functools.partial(_normalize, tuple(options.get("regexes_to_ignore") or ()),
                             bool(options.get("ignore_case")), bool(options.get("ignore_punctuation")),
                             bool(options.get("ignore_numbers")))


def _normalize(regexes: tuple[str, ...], ignore_case: bool, ignore_punctuation: bool, ignore_numbers: bool,
               text: str) -> str:
    for regex in regexes:
        text = re.sub(regex, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text


def _skipped_metrics(path: Path, config: dict, output_type: str) -> None:
    names = {entry.get("metric") if isinstance(entry, dict) else entry for entry in config.get("metric_list") or []}
    skipped = sorted(str(n) for n in names - COMPUTED_METRICS[output_type])
    if skipped:
        log.warning("%s: metrics %s are not computed by llmray for output_type %s (it reports %s)", path,
                    skipped, output_type, sorted(COMPUTED_METRICS[output_type]))


def load_task(name: str, spec: TaskSpec, path: Path, limit: int | None) -> Task:
    """Task ``name`` from the lm-eval task YAML at ``path``; ``spec.num_fewshot`` (if set) overrides the YAML's."""
    config, _ = read_config(path)
    _check_fields(path, config)
    output_type = config.get("output_type", "generate_until")
    _skipped_metrics(path, config, output_type)
    splits = split_files(path, config)
    eval_split = config.get("test_split") or config.get("validation_split")
    if not eval_split:
        raise TaskFormatError(f"{path}: set test_split or validation_split (the split to evaluate)")
    fewshot_split = next(s for s in (config.get("fewshot_split"), config.get("training_split"),
                                     config.get("validation_split"), eval_split) if s)
    for field, split in (("test_split or validation_split", eval_split), ("fewshot split", fewshot_split)):
        if split not in splits:
            raise TaskFormatError(f"{path}: {field} is '{split}', which dataset_kwargs.data_files does not "
                                  f"define (splits: {', '.join(splits)})")
    reader = DocumentReader(path, config)
    documents = _read_documents(splits[eval_split], config["dataset_path"])
    examples = [reader.example(i, record) for i, record in enumerate(documents)]
    if not examples:
        raise TaskFormatError(f"{path}: split '{eval_split}' holds no documents")
    num_fewshot = spec.num_fewshot if spec.num_fewshot is not None else int(config.get("num_fewshot") or 0)
    pool, from_self = examples, True
    if num_fewshot and fewshot_split != eval_split:
        pool, from_self = [reader.example(i, record) for i, record in
                           enumerate(_read_documents(splits[fewshot_split], config["dataset_path"]))], False
    check_fewshot_pool(name, num_fewshot, pool, from_self)
    if num_fewshot and output_type == "loglikelihood_rolling":
        raise TaskFormatError(f"{path}: a loglikelihood_rolling task takes no few-shot examples")
    generation = _generation_kwargs(path, config)
    spec = dataclasses.replace(spec, num_fewshot=num_fewshot, continuation_delimiter=reader.target_delimiter,
                               fewshot_delimiter=config.get("fewshot_delimiter", "\n\n"),
                               max_new_tokens=generation["max_gen_toks"], stop=generation["until"])
    dumped = {**config, "task": name, "num_fewshot": num_fewshot}
    if output_type == "generate_until":
        dumped["generation_kwargs"] = generation
    return Task(name, spec, examples[:limit], pool, from_self, kind=KIND_OF_OUTPUT_TYPE[output_type],
                total=len(examples), config=dumped, version=(config.get("metadata") or {}).get("version"),
                answer_of=exact_match_normalizer(path, config) if output_type == "generate_until" else None)


def _generation_kwargs(path: Path, config: dict) -> dict:
    """Greedy generation settings with lm-eval's defaults: stop at the few-shot delimiter, 256 tokens."""
    kwargs = dict(config.get("generation_kwargs") or {})
    if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0.0:
        raise TaskFormatError(f"{path}: field 'generation_kwargs': only greedy decoding is supported "
                              f"(do_sample false, temperature 0)")
    until = kwargs.get("until", [config.get("fewshot_delimiter", "\n\n")])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
        raise TaskFormatError(f"{path}: field 'generation_kwargs.until': expected a string or a list of strings")
    max_tokens = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise TaskFormatError(f"{path}: field 'generation_kwargs.max_gen_toks': expected a positive integer")
    return {"until": until, "max_gen_toks": max_tokens, "do_sample": False}

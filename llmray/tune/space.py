"""The search space of a sweep: dotted config keys of a trial's stages, each with a distribution.

A sweep never needs code per key: a key is ``<stage>.<path inside that stage's config>``, e.g.
``proxy.train.optimizer.lr`` or ``curate.filters.gopher_quality.min_words``, and list items are
addressed by index (``curate.sources.1.max_docs_per_file``). In YAML the space can be written
flat (dotted keys) or nested; a node is a distribution when it is a mapping with exactly one of
the kinds below::

    space:
      proxy.train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}
      proxy.train.schedule:
        warmup_steps: {choice: [0, 10, 30]}
      curate.filters.gopher_quality.min_words: {grid: [20, 80]}

Design choices:

* Keys are checked against the stage's config dataclass when the sweep config is loaded (an
  unknown key fails in the first second, naming the closest spelling); *values* are checked
  per trial, so a sampled value the stage rejects errors that trial only and the sweep goes on.
* ``grid`` values are always enumerated; with ``search: grid`` every ``choice`` is enumerated
  too, so one space serves both random and exhaustive search.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from llmray.config import ConfigError, as_number

# kind -> number of arguments (None: a non-empty list of values)
KINDS: dict[str, int | None] = {
    "choice": None, "grid": None,
    "uniform": 2, "quniform": 3, "loguniform": 2, "qloguniform": 3,
    "randint": 2, "lograndint": 2,
}
_RANGES = {"uniform", "quniform", "loguniform", "qloguniform", "randint", "lograndint"}


@dataclass(frozen=True)
class Domain:
    """One swept key: ``kind`` from :data:`KINDS` and its arguments."""

    kind: str
    args: tuple

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def to_tune(self, enumerate_choices: bool = False) -> Any:
        """The Ray Tune domain (``grid_search`` for grids, and for choices when enumerating)."""
        from ray import tune

        if self.kind == "grid" or (self.kind == "choice" and enumerate_choices):
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


def is_domain(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and next(iter(node)) in KINDS


def parse_space(spec: dict) -> dict[str, Domain]:
    """Flatten a (possibly nested) space mapping into ``{dotted key: Domain}``, checking each entry."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError("space: give at least one key, e.g. proxy.train.optimizer.lr: {loguniform: [1e-4, 1e-1]}")
    flat: dict[str, Domain] = {}
    _flatten(spec, "", flat)
    return flat


def _flatten(node: Any, prefix: str, out: dict[str, Domain]) -> None:
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if is_domain(value):
            out[path] = _domain(path, value)
        elif isinstance(value, dict) and value:
            _flatten(value, path, out)
        else:
            raise ConfigError(f"space.{path}: expected a distribution, one of "
                              f"{', '.join(f'{{{k}: ...}}' for k in KINDS)}; got {value!r}")


def _domain(path: str, node: dict) -> Domain:
    kind, args = next(iter(node.items()))
    where = f"space.{path}.{kind}"
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: expected a non-empty list, got {args!r}")
    arity = KINDS[kind]
    if arity is not None:
        if len(args) != arity:
            raise ConfigError(f"{where}: expected {arity} numbers, got {args!r}")
        numbers = [as_number(a, where) for a in args]
        low, high = numbers[0], numbers[1]
        if not low < high:
            raise ConfigError(f"{where}: the low end {low} must be below the high end {high}")
        if kind.startswith("log") or kind.startswith("qlog"):
            if low <= 0:
                raise ConfigError(f"{where}: a log-scale range needs a positive low end, got {low}")
        if kind in ("randint", "lograndint") and not all(float(n).is_integer() for n in numbers):
            raise ConfigError(f"{where}: integer bounds expected, got {args!r}")
        if kind in ("randint", "lograndint"):
            numbers = [int(n) for n in numbers]
        return Domain(kind, tuple(numbers))
    return Domain(kind, tuple(args))


# ---------------------------------------------------------------------------------------------
# Keys: checking them against config classes, setting them in raw config data
# ---------------------------------------------------------------------------------------------

def check_key(key: str, stage_classes: dict[str, type]) -> None:
    """Raise :class:`ConfigError` unless ``key`` = ``<stage>.<field path>`` names a config value."""
    stage, _, rest = key.partition(".")
    if stage not in stage_classes:
        raise ConfigError(_unknown(f"space key '{key}': unknown stage '{stage}'", stage, list(stage_classes),
                                   "the sweep's stages"))
    if not rest:
        raise ConfigError(f"space key '{key}': name a key inside stage '{stage}', e.g. {stage}.<field>")
    _check_path(stage_classes[stage], rest.split("."), key, stage)


def _check_path(tp: Any, parts: list[str], key: str, where: str) -> None:
    tp = _strip_optional(tp)
    if not parts:
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"space key '{key}': '{where}' is a section; sweep one of its keys")
        return
    head, rest = parts[0], parts[1:]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        if head not in fields:
            raise ConfigError(_unknown(f"space key '{key}': '{head}' is not a key of {where}", head,
                                       list(fields), where))
        _check_path(typing.get_type_hints(tp)[head], rest, key, f"{where}.{head}")
    elif origin in (list, tuple):
        if not head.isdigit():
            raise ConfigError(f"space key '{key}': {where} is a list; address an item by index, "
                              f"e.g. {where}.0")
        _check_path(args[0] if args else Any, rest, key, f"{where}.{head}")
    elif origin is dict:
        _check_path(args[1] if args else Any, rest, key, f"{where}.{head}")
    elif tp is not Any:
        raise ConfigError(f"space key '{key}': {where} holds a value, not a section")


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _unknown(message: str, name: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; keys of {where}: {', '.join(sorted(valid))}"
    return message + hint


def with_values(stages: dict[str, dict], values: dict[str, Any]) -> dict[str, dict]:
    """A deep copy of raw stage configs with ``values`` (``{dotted key: value}``) set."""
    stages = copy.deepcopy(stages)
    for key, value in values.items():
        stage, *path = key.split(".")
        node: Any = stages.setdefault(stage, {})
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                index = int(part)
                if index >= len(node):
                    raise ConfigError(f"'{key}': {stage}.{'.'.join(path[:i])} has {len(node)} items, "
                                      f"no item {index}")
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"'{key}': {stage}.{'.'.join(path[:i])} holds a value, not a section")
    return stages

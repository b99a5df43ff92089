"""The layering of DESIGN.md, checked on the source: no subpackage imports a layer above it, no cycles.

Every ``llmray/**/*.py`` is parsed with :mod:`ast` (nothing is imported or executed) and every
import statement anywhere in the file counts: module level, inside functions and methods, in class
bodies, under ``if TYPE_CHECKING:`` or ``try:``. A lazy import inside a function is still a
dependency of that layer; hiding it in a function only moves the failure from import time to call
time. The forms seen are ``import llmray.a.b``, ``from llmray.a.b import c``, ``from llmray import a``
and relative imports (``from . import x``, ``from ..a import b``), resolved against the file's own
package. String references resolved at run time (the stage registry's ``"module:attr"``) are not
imports and are not seen.

Each import is attributed to a *unit*: the first component after ``llmray.`` (``llmray.data.readers.
sources`` → ``data``); a top-level module is its own unit (``llmray/config.py`` → ``config``) and
``llmray/__init__.py`` is the unit ``llmray``. Imports within one unit are ignored.

Cycle detection runs on the graph of *all* units, top-level modules included. ``config``, ``runs``,
``cluster`` are the foundation every subpackage imports; a cycle through one of them (``runs``
importing a helper from ``data`` while ``data`` imports ``runs``) is as real a layering break, and as
likely to fail with a partially initialised module, as one between subpackages. The top of the
stack (``cli``, ``pipeline``, ``stages``) reaches the stages only through the lazy string registry,
so including it adds no false cycles. For each cycle the imports reported are those of the cheapest
set of unit edges (fewest imports) whose removal breaks it, i.e. the stray import(s) rather than the
dozen legitimate ones in the other direction; each with the shortest cycle it closes.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "llmray"

# unit -> units it must not import (DESIGN.md: "data knows nothing of models; model knows nothing of
# parallelism or Ray; parallel/ applies strategies to a plain model; train/ has one core ...").
FORBIDDEN: dict[str, frozenset[str]] = {
    "model": frozenset({"parallel", "train", "data", "align"}),
    "parallel": frozenset({"train"}),
    "data": frozenset({"model", "train", "tokens"}),
    "tokens": frozenset({"train"}),
    "eval": frozenset({"train"}),
}

# The subpackages whose mutual cycles the test must see at the very least (all units are checked).
CORE_UNITS = ("model", "parallel", "train", "data", "tokens", "tokenizer", "align", "eval", "tune")


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the package's parent, e.g. "llmray/model/generate.py"
    line: int
    module: str  # absolute dotted name imported, e.g. "llmray.train.trainer"
    source: str  # unit of the importing file
    target: str  # unit of the imported module

    def describe(self, rule: str) -> str:
        return f"{self.file}:{self.line} imports {self.module} ({rule})"


def _module_parts(package_dir: Path, path: Path) -> tuple[list[str], list[str]]:
    """(dotted parts of the module, dotted parts of the package a relative import starts from)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return parts[:-1], parts[:-1]
    return parts, parts[:-1]


def _is_module(package_dir: Path, parts: list[str]) -> bool:
    base = package_dir.parent.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _unit(package: str, parts: list[str]) -> str:
    return parts[1] if len(parts) > 1 else package


def _imported_modules(package_dir: Path, node: ast.AST, package_parts: list[str]) -> list[str]:
    """Absolute dotted names an import node brings in (all of them; filtering comes later)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        if node.level - 1 > len(package_parts):
            return []  # relative import beyond the top-level package: not ours
        base = package_parts[:len(package_parts) - (node.level - 1)]
        base = base + (node.module.split(".") if node.module else [])
    else:
        base = node.module.split(".")
    if not base:
        return []
    names = []
    for alias in node.names:
        # `from llmray.train import trainer` names the submodule; `from llmray.train.x import Y` the module
        sub = base + [alias.name]
        names.append(".".join(sub) if alias.name != "*" and _is_module(package_dir, sub) else ".".join(base))
    return names


def scan(package_dir: Path) -> list[Import]:
    """Every import of the package by the package across units, in file and line order."""
    package = package_dir.name
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        module_parts, package_parts = _module_parts(package_dir, path)
        source = _unit(package, module_parts)
        rel = path.relative_to(package_dir.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for module in _imported_modules(package_dir, node, package_parts):
                parts = module.split(".")
                if parts[0] != package:
                    continue
                target = _unit(package, parts)
                if target != source:
                    found.append(Import(rel, node.lineno, module, source, target))
    return sorted(set(found), key=lambda imp: (imp.file, imp.line, imp.module))


def layer_violations(imports: list[Import], forbidden: dict[str, frozenset[str]] = FORBIDDEN) -> list[str]:
    return [imp.describe(f"{imp.source} must not import {imp.target}")
            for imp in imports if imp.target in forbidden.get(imp.source, ())]


def _graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one unit (i.e. the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_path(graph: dict[str, set[str]], start: str, goal: str, within: set[str]) -> list[str]:
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for nxt in sorted(graph[node] & within):
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    path, node = [], goal
    while node is not None:
        path.append(node)
        node = previous[node]
    return path[::-1]


def _acyclic(nodes: set[str], edges: set[tuple[str, str]]) -> bool:
    indegree = {node: 0 for node in nodes}
    for _, target in edges:
        indegree[target] += 1
    ready = [node for node, degree in indegree.items() if degree == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for source, target in edges:
            if source == node:
                indegree[target] -= 1
                if indegree[target] == 0:
                    ready.append(target)
    return seen == len(nodes)


MAX_CYCLE_EDGES = 16  # above this, a component's edges are all reported instead of searched


def _cycle_breaking_edges(component: set[str], weight: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The unit edges of every cheapest set (fewest imports) whose removal leaves ``component`` acyclic.

    The cheapest cut names the import(s) that most likely went the wrong way: in the usual case
    one stray ``model -> train`` import against a dozen ``train -> model`` ones. Ties are all
    reported (in a two-way cycle of one import each, either may be the wrong one).
    """
    edges = sorted(edge for edge in weight if edge[0] in component and edge[1] in component)
    if len(edges) > MAX_CYCLE_EDGES:
        return set(edges)
    best, chosen = None, set()
    for mask in range(1, 1 << len(edges)):
        cut = {edge for bit, edge in enumerate(edges) if mask >> bit & 1}
        cost = sum(weight[edge] for edge in cut)
        if best is not None and cost > best:
            continue
        if _acyclic(component, set(edges) - cut):
            if best is None or cost < best:
                best, chosen = cost, set()
            chosen |= cut
    return chosen


def cycle_violations(imports: list[Import]) -> list[str]:
    """For each cycle of units, the imports of the cheapest cut that breaks it, with the cycle they close."""
    graph = _graph(imports)
    weight: dict[tuple[str, str], int] = {}
    for imp in imports:
        weight[imp.source, imp.target] = weight.get((imp.source, imp.target), 0) + 1
    messages = []
    for component in strongly_connected(graph):
        cut = _cycle_breaking_edges(component, weight)
        for imp in imports:
            if (imp.source, imp.target) in cut:
                cycle = [imp.source, *_shortest_path(graph, imp.target, imp.source, component)]
                messages.append(imp.describe("import cycle " + " -> ".join(cycle)))
    return messages


def check(package_dir: Path) -> list[str]:
    imports = scan(package_dir)
    return layer_violations(imports) + cycle_violations(imports)


def _failure(violations: list[str]) -> str:
    return (f"{len(violations)} import(s) break the layering of DESIGN.md; move the code both sides need "
            "to the lower layer (for a cycle, the import(s) listed are the fewest whose removal breaks "
            "it):\n  " + "\n  ".join(violations))


# ---------------------------------------------------------------------------------------------
# The real package
# ---------------------------------------------------------------------------------------------

def test_the_scanner_sees_the_real_package():
    """Guard against a checker that passes because it looks at nothing."""
    imports = scan(PACKAGE_DIR)
    edges = {(imp.source, imp.target) for imp in imports}
    assert {("train", "model"), ("parallel", "model"), ("data", "runs")} <= edges
    assert set(CORE_UNITS) <= {imp.source for imp in imports}


def test_no_forbidden_imports_and_no_cycles():
    violations = check(PACKAGE_DIR)
    assert not violations, _failure(violations)


# ---------------------------------------------------------------------------------------------
# The checker itself, on synthetic packages
# ---------------------------------------------------------------------------------------------

def _package(root: Path, files: dict[str, str]) -> Path:
    """``root/llmray`` holding ``files`` (paths relative to the package), every folder a package."""
    package_dir = root / "llmray"
    for rel, text in {"__init__.py": "", **files}.items():
        path = package_dir / rel
        for parent in [path.parent, *path.parent.parents]:
            if parent == package_dir.parent:
                break
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "__init__.py").touch()
        path.write_text(text)
    return package_dir


BASE = {"model/__init__.py": "", "model/llama.py": "", "train/__init__.py": "", "train/trainer.py": "Trainer = 1\n"}



@pytest.mark.parametrize("source, module", [
    ("import llmray.train.trainer\n", "llmray.train.trainer"),
    ("import llmray.train as t\n", "llmray.train"),
    ("from llmray import train\n", "llmray.train"),
    ("from llmray.train import trainer\n", "llmray.train.trainer"),
    ("from llmray.train.trainer import Trainer\n", "llmray.train.trainer"),
    ("from .. import train\n", "llmray.train"),
    ("from ..train import trainer\n", "llmray.train.trainer"),
    ("from ..train.trainer import Trainer\n", "llmray.train.trainer"),
    ("def sample():\n    from llmray.train import trainer\n", "llmray.train.trainer"),
    ("class Sampler:\n    def step(self):\n        import llmray.train.trainer\n", "llmray.train.trainer"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmray.train import trainer\n",
     "llmray.train.trainer"),
])
def test_a_forbidden_import_in_any_form_is_reported(tmp_path, source, module):
    line = source.count("\n")  # the import is the last line of each snippet
    package_dir = _package(tmp_path, {**BASE, "model/generate.py": source})
    assert check(package_dir) == [f"llmray/model/generate.py:{line} imports {module} (model must not import train)"]


def test_relative_import_in_a_subpackage_init_resolves_against_that_package(tmp_path):
    init = "from . import llama\nfrom ..train import trainer\n"
    package_dir = _package(tmp_path, {**BASE, "model/__init__.py": init})
    assert check(package_dir) == [
        "llmray/model/__init__.py:2 imports llmray.train.trainer (model must not import train)"]


def test_allowed_and_internal_imports_are_not_reported(tmp_path):
    package_dir = _package(tmp_path, {
        **BASE,
        "config.py": "import os\n",
        "model/generate.py": "from . import llama\nfrom llmray.model.llama import x\nfrom llmray.config import param\n",
        "train/trainer.py": "from llmray.model import llama\nfrom llmray import config\nimport torch\n",
    })
    imports = scan(package_dir)
    assert {(imp.source, imp.target) for imp in imports} == {("model", "config"), ("train", "model"),
                                                             ("train", "config")}
    assert check(package_dir) == []


def test_a_cycle_between_subpackages_is_reported_on_every_edge(tmp_path):
    package_dir = _package(tmp_path, {
        "data/records.py": "def f():\n    from llmray.tokenizer import chat\n",
        "tokenizer/chat.py": "from llmray.data import records\n",
    })
    assert check(package_dir) == [
        "llmray/data/records.py:2 imports llmray.tokenizer.chat (import cycle data -> tokenizer -> data)",
        "llmray/tokenizer/chat.py:1 imports llmray.data.records (import cycle tokenizer -> data -> tokenizer)",
    ]


def test_a_cycle_through_a_top_level_module_is_reported(tmp_path):
    package_dir = _package(tmp_path, {
        "runs.py": "from llmray.eval import results\n",
        "eval/results.py": "from llmray.model import llama\n",
        "model/llama.py": "from llmray import runs\n",
    })
    assert sorted(check(package_dir)) == [
        "llmray/eval/results.py:1 imports llmray.model.llama (import cycle eval -> model -> runs -> eval)",
        "llmray/model/llama.py:1 imports llmray.runs (import cycle model -> runs -> eval -> model)",
        "llmray/runs.py:1 imports llmray.eval.results (import cycle runs -> eval -> model -> runs)",
    ]


def test_layer_and_cycle_violations_are_both_listed(tmp_path):
    package_dir = _package(tmp_path, {
        **BASE,
        "model/llama.py": "from llmray.train import trainer\n",
        "train/trainer.py": "from llmray.model import llama\n",
    })
    assert check(package_dir) == [
        "llmray/model/llama.py:1 imports llmray.train.trainer (model must not import train)",
        "llmray/model/llama.py:1 imports llmray.train.trainer (import cycle model -> train -> model)",
        "llmray/train/trainer.py:1 imports llmray.model.llama (import cycle train -> model -> train)",
    ]


def test_a_cycle_names_the_stray_import_not_the_many_legitimate_ones(tmp_path):
    package_dir = _package(tmp_path, {
        "data/records.py": "",
        "tokenizer/train.py": "from llmray.data import records\n",
        "tokenizer/report.py": "from llmray.data.records import x\n",
        "tokens/shards.py": "from llmray.data import records\n",
        "data/curate.py": "import json\n\n\ndef run():\n    from llmray.tokens import shards\n",
        "tokens/tokenize.py": "from llmray.tokenizer import train\n",
    })
    # data -> tokens (1 import) closes both data -> tokens -> data and data -> tokens -> tokenizer -> data
    assert check(package_dir) == [
        "llmray/data/curate.py:5 imports llmray.tokens.shards (data must not import tokens)",
        "llmray/data/curate.py:5 imports llmray.tokens.shards (import cycle data -> tokens -> data)",
    ]

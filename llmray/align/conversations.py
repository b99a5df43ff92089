"""SFT conversations from the real instruction data, mixed by weight and split train/validation.

Sources (``kind`` of an :class:`SftSource`):

* ``oasst``: OpenAssistant message trees (one tree per line). Every root-to-leaf thread becomes a
  conversation; where annotators ranked several assistant replies, only the best-ranked one
  (``rank`` 0; unranked replies count as worse) is followed, while every user follow-up is a
  thread of its own. Deleted messages (and what hangs below them) are skipped; model-written
  (``synthetic``) trees are left out unless ``include_synthetic``. A thread ending in a user turn
  is cut back to its last assistant turn. ``meta.lang`` keeps the tree's language; the split
  group is the tree, so threads of one tree never straddle train and validation.
* ``self_instruct``: human-written tasks; ``instruction`` (+ blank line + ``input`` when given)
  is the user turn and each instance's ``output`` the assistant turn.
* ``gsm8k``: ``question`` → worked ``answer``; the ``<<48/2=24>>`` calculator annotations are
  removed (they are tool traces, not text to imitate); the ``#### <number>`` line stays so
  answers remain exact-match gradable.
* ``messages``: user-supplied JSONL of ``{"messages": [{"role", "content"}, ...]}`` (optional ``id``).

Mixture: a source's ``weight`` is how many times each of its training conversations appears per
epoch (2.0: twice; 0.3: a hash-chosen 30%). Validation conversations appear once, unweighted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from llmray.align.records import (Quarantined, RecordError, RecordSource, check_conversation, field, read_source_items,
                                  split_sources, unit_hash)
from llmray.config import param

_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass
class Conversation:
    id: str
    group: str  # split unit: conversations sharing it land in the same split
    source: str
    messages: list[dict[str, str]]
    meta: dict = dc_field(default_factory=dict)


@dataclass
class SftSource(RecordSource):
    """One instruction dataset in the SFT mixture."""

    kind: Literal["oasst", "self_instruct", "gsm8k", "messages"] = param(
        "messages", doc="format: oasst (message trees), self_instruct, gsm8k, messages (user JSONL)")
    weight: float = param(1.0, doc="times each training conversation appears per epoch (fractions sample "
                                   "by hash)", min=0.0)


# ---------------------------------------------------------------------------------------------
# Readers: each yields (line number, Conversation | RecordError) per conversation of a record
# ---------------------------------------------------------------------------------------------

def _oasst(record: Any, line: int, src: SftSource) -> Iterator[Conversation]:
    tree_id = field(record, "message_tree_id", str, "tree")
    root = field(record, "prompt", dict, "tree")
    if root.get("synthetic") and not src.include_synthetic:
        return
    lang = root.get("lang")
    seen: set[tuple[str, ...]] = set()
    for thread in oasst_threads(root):
        ids = tuple(node["message_id"] for node in thread)
        if ids in seen:
            continue
        seen.add(ids)
        messages = [{"role": "user" if n["role"] == "prompter" else "assistant", "content": n["text"]}
                    for n in thread]
        yield Conversation(id=f"{src.label}:{tree_id}:{ids[-1]}", group=f"{src.label}:{tree_id}",
                           source=src.label, messages=check_conversation(messages, f"tree {tree_id} thread"),
                           meta={"lang": lang, "message_ids": list(ids)})


def oasst_threads(root: dict) -> Iterator[list[dict]]:
    """Root-to-leaf threads through best-ranked assistant replies, each ending with an assistant turn."""
    for where, node in _walk_nodes(root, "prompt"):
        field(node, "text", str, where)
        role = field(node, "role", str, where)
        if role not in ("prompter", "assistant"):
            raise RecordError("bad_role", f"{where}.role is {role!r}, expected prompter or assistant")
        field(node, "message_id", str, where)

    def walk(node: dict, path: list[dict]) -> Iterator[list[dict]]:
        path = path + [node]
        replies = [r for r in node.get("replies") or [] if not r.get("deleted")]
        if node["role"] == "prompter":
            if replies:
                best = min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))
                yield from walk(best, path)
            elif len(path) > 1:
                yield path[:-1]
        elif replies:
            for reply in replies:
                yield from walk(reply, path)
        else:
            yield path

    if not root.get("deleted"):
        yield from walk(root, [])


def _walk_nodes(node: Any, where: str) -> Iterator[tuple[str, dict]]:
    if not isinstance(node, dict):
        raise RecordError("wrong_type", f"{where} is a {type(node).__name__}, expected a message object")
    yield where, node
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise RecordError("wrong_type", f"{where}.replies is a {type(replies).__name__}, expected a list")
    for index, reply in enumerate(replies):
        yield from _walk_nodes(reply, f"{where}.replies[{index}]")


def _self_instruct(record: Any, line: int, src: SftSource) -> Iterator[Conversation]:
    instruction = field(record, "instruction", str, "task")
    task_id = str(record.get("id", line))
    instances = field(record, "instances", list, "task")
    for index, instance in enumerate(instances):
        given = field(instance, "input", str, f"instances[{index}]") if instance.get("input") else ""
        output = field(instance, "output", str, f"instances[{index}]")
        prompt = f"{instruction}\n\n{given}" if given.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        yield Conversation(id=f"{src.label}:{task_id}:{index}", group=f"{src.label}:{task_id}",
                           source=src.label, messages=check_conversation(messages, f"task {task_id}"))


def _gsm8k(record: Any, line: int, src: SftSource) -> Iterator[Conversation]:
    question = field(record, "question", str, "problem")
    answer = _CALCULATOR.sub("", field(record, "answer", str, "problem"))
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    key = f"{src.label}:{Path(src.path).name}:{line}"
    yield Conversation(id=key, group=key, source=src.label, messages=check_conversation(messages))


def _messages(record: Any, line: int, src: SftSource) -> Iterator[Conversation]:
    messages = field(record, "messages", list, "record")
    key = f"{src.label}:{record.get('id', f'{Path(src.path).name}:{line}')}"
    yield Conversation(id=key, group=key, source=src.label, messages=check_conversation(messages))


READERS: dict[str, Callable[[Any, int, SftSource], Iterator[Conversation]]] = {
    "oasst": _oasst, "self_instruct": _self_instruct, "gsm8k": _gsm8k, "messages": _messages}


def read_source(src: SftSource) -> Iterator[Conversation | Quarantined]:
    """Every conversation of ``src`` in file order; bad records come out as Quarantined."""
    return read_source_items(src, READERS)


# ---------------------------------------------------------------------------------------------
# The mixture
# ---------------------------------------------------------------------------------------------

@dataclass
class Mixture:
    train: list[Conversation]
    val: list[Conversation]
    quarantined: list[Quarantined]
    counts: dict[str, dict[str, int]]  # source → {"read", "train", "val", "quarantined"}


def copies(conversation_id: str, weight: float, seed: int) -> int:
    """How many times a training conversation appears per epoch under ``weight``."""
    whole = int(weight)
    return whole + (1 if unit_hash(f"copies\0{conversation_id}", seed) < weight - whole else 0)


def build_mixture(sources: list[SftSource], val_fraction: float, seed: int = 0,
                  max_quarantine_fraction: float = 0.5) -> Mixture:
    return Mixture(*split_sources(sources, read_source, val_fraction, seed, max_quarantine_fraction,
                                  copies=lambda item, src: copies(item.id, src.weight, seed)))

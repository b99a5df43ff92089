"""Preference pairs (prompt messages, chosen reply, rejected reply) from real data and user JSONL.

Sources (``kind`` of a :class:`PreferenceSource`):

* ``hh_rlhf``: Anthropic HH-RLHF records ``{"chosen": str, "rejected": str}``, each a whole
  dialogue ``"\\n\\nHuman: …\\n\\nAssistant: …"``. Both are parsed into turns; they must share every
  turn but the final assistant one (the prompt), else the record is quarantined
  (``prompt_mismatch``), as are unparseable dialogues (``bad_dialogue``) and pairs whose replies
  are identical (``identical_replies``).
* ``oasst``: OpenAssistant trees. Wherever annotators ranked ≥ 2 assistant replies to a user turn,
  the best-ranked reply is paired with each lower-ranked one. The prompt is the thread to that user
  turn through best-ranked assistant replies (as for SFT). The split group is the tree.
* ``preferences``: user JSONL ``{"prompt": messages, "chosen": reply, "rejected": reply}`` where a
  reply is a string, an assistant message, or a one-message list holding one; the prompt must end
  with a user turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from llmray.align.records import Quarantined, RecordError, RecordSource, check_messages, field, read_source_items
from llmray.config import param

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class Pair:
    id: str
    group: str
    source: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    meta: dict = dc_field(default_factory=dict)


@dataclass
class PreferenceSource(RecordSource):
    """One preference dataset in the DPO mixture."""

    kind: Literal["hh_rlhf", "oasst", "preferences"] = param(
        "preferences", doc="format: hh_rlhf (Human/Assistant dialogues), oasst (ranked sibling replies), "
                           "preferences (user JSONL)")


def parse_hh_dialogue(text: str, where: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` → user/assistant messages (strictly alternating)."""
    pieces = _HH_TURN.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        raise RecordError("bad_dialogue", f"{where} does not start with '\\n\\nHuman: '")
    messages = []
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            raise RecordError("bad_dialogue", f"{where} has two {speaker} turns in a row")
        messages.append({"role": role, "content": content.strip()})
    return check_messages(messages, where)


def _hh_rlhf(record: Any, line: int, src: PreferenceSource) -> Iterator[Pair]:
    chosen = parse_hh_dialogue(field(record, "chosen", str, "record"), "chosen")
    rejected = parse_hh_dialogue(field(record, "rejected", str, "record"), "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordError("bad_turn_order", "chosen and rejected must both end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("prompt_mismatch", "chosen and rejected differ before their final Assistant turn")
    key = f"{src.label}:{Path(src.path).name}:{line}"
    yield _pair(key, key, src, chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _oasst(record: Any, line: int, src: PreferenceSource) -> Iterator[Pair]:
    from llmray.align.conversations import oasst_threads

    tree_id = field(record, "message_tree_id", str, "tree")
    root = field(record, "prompt", dict, "tree")
    if root.get("synthetic") and not src.include_synthetic:
        return
    list(oasst_threads(root))  # validates every node of the tree
    yield from _ranked_pairs(root, [], tree_id, src)


def _ranked_pairs(node: dict, prompt: list[dict], tree_id: str, src: PreferenceSource) -> Iterator[Pair]:
    """Pairs at every user turn reached through best-ranked assistant replies."""
    if node.get("deleted"):
        return
    role = "user" if node["role"] == "prompter" else "assistant"
    prompt = prompt + [{"role": role, "content": node["text"]}]
    replies = [r for r in node.get("replies") or [] if not r.get("deleted")]
    if role == "assistant":
        for reply in replies:
            yield from _ranked_pairs(reply, prompt, tree_id, src)
        return
    ranked = sorted((r for r in replies if r.get("rank") is not None), key=lambda r: r["rank"])
    for worse in ranked[1:]:
        if worse["text"].strip() and ranked[0]["text"].strip() and worse["text"] != ranked[0]["text"]:
            yield _pair(f"{src.label}:{tree_id}:{ranked[0]['message_id']}>{worse['message_id']}",
                        f"{src.label}:{tree_id}", src, check_messages(prompt, f"tree {tree_id} prompt"),
                        ranked[0]["text"], worse["text"], {"lang": node.get("lang")})
    if replies:
        best = min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))
        yield from _ranked_pairs(best, prompt, tree_id, src)


def _reply(value: Any, where: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError("wrong_type", f"{where} is a list of {len(value)} messages, expected one")
        value = value[0]
    if isinstance(value, dict):
        message = check_messages([value], where)[0]
        if message["role"] != "assistant":
            raise RecordError("bad_role", f"{where} has role {message['role']!r}, expected assistant")
        return message["content"]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"{where} is a {type(value).__name__}, expected a string or message")
    if not value.strip():
        raise RecordError("empty_content", f"{where} is empty")
    return value


def _preferences(record: Any, line: int, src: PreferenceSource) -> Iterator[Pair]:
    prompt = check_messages(field(record, "prompt", list, "record"), "prompt")
    if prompt[-1]["role"] != "user":
        raise RecordError("bad_turn_order", f"prompt ends with a {prompt[-1]['role']} turn, expected user")
    chosen = _reply(field(record, "chosen", (str, dict, list), "record"), "chosen")
    rejected = _reply(field(record, "rejected", (str, dict, list), "record"), "rejected")
    key = f"{src.label}:{record.get('id', f'{Path(src.path).name}:{line}')}"
    yield _pair(key, key, src, prompt, chosen, rejected)


def _pair(key: str, group: str, src: PreferenceSource, prompt: list[dict], chosen: str, rejected: str,
          meta: dict | None = None) -> Pair:
    if chosen == rejected:
        raise RecordError("identical_replies", "chosen and rejected replies are identical")
    return Pair(key, group, src.label, prompt, chosen, rejected, meta or {})


READERS: dict[str, Callable[[Any, int, PreferenceSource], Iterator[Pair]]] = {
    "hh_rlhf": _hh_rlhf, "oasst": _oasst, "preferences": _preferences}


def read_source(src: PreferenceSource) -> Iterator[Pair | Quarantined]:
    """Every pair of ``src`` in file order; bad records come out as Quarantined."""
    return read_source_items(src, READERS)

"""SFT data: real instruction sources become conversations; bad records are quarantined with a reason."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llmray.align.conversations import SftSource, build_mixture, oasst_threads, read_source
from llmray.align.records import Quarantined
from llmray.data.readers.errors import QuarantineExceeded


def _node(mid, role, text, rank=None, replies=(), **extra):
    return {"message_id": mid, "role": role, "text": text, "rank": rank, "replies": list(replies),
            "lang": "en", **extra}


def test_oasst_threads_follow_best_ranked_replies_and_every_user_branch():
    tree = _node("p", "prompter", "Q?", replies=[
        _node("a-worse", "assistant", "meh", rank=1, replies=[_node("p-x", "prompter", "never seen")]),
        _node("a-best", "assistant", "good", rank=0, replies=[
            _node("p1", "prompter", "more?", replies=[_node("a1", "assistant", "sure", rank=0)]),
            _node("p2", "prompter", "no answer yet"),
            _node("p3", "prompter", "deleted branch", deleted=True,
                  replies=[_node("a3", "assistant", "x", rank=0)]),
        ]),
    ])
    threads = [[n["message_id"] for n in thread] for thread in oasst_threads(tree)]
    assert threads == [["p", "a-best", "p1", "a1"], ["p", "a-best"]]


def test_real_oasst_threads_use_only_best_ranked_assistant_replies(shared_data):
    path = shared_data / "oasst1_en_100" / "en_100_tree.jsonl"
    src = SftSource(kind="oasst", path=str(path))
    conversations = list(read_source(src))
    assert conversations and not any(isinstance(c, Quarantined) for c in conversations)
    ranks = {}
    for line in path.read_text().splitlines():
        stack = [json.loads(line)["prompt"]]
        while stack:
            node = stack.pop()
            siblings = [r for r in node.get("replies") or [] if not r.get("deleted")]
            for reply in siblings:
                ranks[reply["message_id"]] = (reply.get("rank"), min(
                    (r.get("rank") for r in siblings if r.get("rank") is not None), default=None))
            stack.extend(siblings)
    for conversation in conversations:
        assert conversation.messages[-1]["role"] == "assistant"
        assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * (len(conversation.messages) // 2)
        assert conversation.meta["lang"] == "en"
        for mid, message in zip(conversation.meta["message_ids"], conversation.messages):
            if message["role"] == "assistant":
                rank, best = ranks[mid]
                assert rank == best  # the best-ranked sibling (or the only one)
    assert max(len(c.messages) for c in conversations) >= 4  # multi-turn threads exist
    assert len({c.id for c in conversations}) == len(conversations)
    synthetic = list(read_source(SftSource(kind="oasst", path=str(path), include_synthetic=True)))
    assert len(synthetic) > len(conversations)  # the 5 model-written trees are left out by default


def test_self_instruct_and_gsm8k(shared_data):
    tasks = list(read_source(SftSource(kind="self_instruct",
                                       path=str(shared_data / "self_instruct_human" / "seed_tasks.jsonl"))))
    assert len(tasks) >= 175
    with_input = [t for t in tasks if "\n\n" in t.messages[0]["content"]]
    assert with_input, "instances with an input append it to the instruction"
    problems = list(read_source(SftSource(kind="gsm8k", path=str(shared_data / "gsm8k" / "train.jsonl.gz"),
                                          max_records=50)))
    assert len(problems) == 50
    answer = problems[0].messages[1]["content"]
    assert "<<" not in answer and answer.strip().splitlines()[-1].startswith("#### ")


def test_bad_records_are_quarantined_with_a_reason_and_good_ones_kept(tmp_path):
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"text": "no messages"}),
        json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                 {"role": "assistant", "content": "c"}]}),
        json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "c"}]}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"messages": "a string"}),
        json.dumps(good),
    ]
    path = tmp_path / "user.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QuarantineExceeded, match=r"source 'messages' \(.*user.jsonl\): 10 of 12 records "
                                                 r"quarantined(.|\n)*invalid_json: .*user.jsonl:2: not valid JSON"):
        build_mixture([SftSource(kind="messages", path=str(path))], val_fraction=0.0)  # default limit 0.5
    mixture = build_mixture([SftSource(kind="messages", path=str(path))], val_fraction=0.0,
                            max_quarantine_fraction=1.0)
    assert len(mixture.train) == 2 and mixture.train[0].messages == good["messages"]
    reasons = {q.offset: q.error for q in mixture.quarantined}
    assert reasons == {2: "invalid_json", 3: "missing_field", 4: "bad_role", 5: "empty_content",
                       6: "wrong_type", 7: "no_assistant_turn", 8: "bad_turn_order", 9: "missing_field",
                       10: "wrong_type", 11: "wrong_type"}
    by_line = {q.offset: q for q in mixture.quarantined}
    assert "messages[0].role" in by_line[4].message and "'bot'" in by_line[4].message
    assert "messages[0].content" in by_line[6].message and "int" in by_line[6].message
    assert all(q.path == str(path) for q in mixture.quarantined)
    assert mixture.counts["messages"] == {"read": 2, "train": 2, "val": 0, "quarantined": 10}


def test_mixture_weights_and_group_consistent_split(shared_data):
    oasst = str(shared_data / "oasst1_en_100" / "en_100_tree.jsonl")
    gsm8k = str(shared_data / "gsm8k" / "train.jsonl.gz")
    mixture = build_mixture([SftSource(kind="oasst", path=oasst, weight=2.0),
                             SftSource(kind="gsm8k", path=gsm8k, max_records=1000, weight=0.25)],
                            val_fraction=0.2, seed=3)
    counts = Counter(c.source for c in mixture.train)
    train_oasst = {c.id for c in mixture.train if c.source == "oasst"}
    assert counts["oasst"] == 2 * len(train_oasst)
    assert 0.18 < counts["gsm8k"] / mixture.counts["gsm8k"]["read"] < 0.25  # 0.25 of the 80% train share
    train_groups, val_groups = {c.group for c in mixture.train}, {c.group for c in mixture.val}
    assert not train_groups & val_groups
    read = sum(c["read"] for c in mixture.counts.values())
    assert 0.15 < sum(c["val"] for c in mixture.counts.values()) / read < 0.25
    again = build_mixture([SftSource(kind="oasst", path=oasst, weight=2.0),
                           SftSource(kind="gsm8k", path=gsm8k, max_records=1000, weight=0.25)],
                          val_fraction=0.2, seed=3)
    assert [c.id for c in again.train] == [c.id for c in mixture.train]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_source(SftSource(kind="messages", path=str(tmp_path / "nope.jsonl"))))

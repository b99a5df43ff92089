"""Preference pairs: HH-RLHF dialogues, OASST ranked siblings, user JSONL; encoding of the scored reply."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest

from llmray.align.pairs import encode_pairs
from llmray.align.preferences import PreferenceSource, parse_hh_dialogue, read_source
from llmray.align.records import Quarantined, RecordError
from tests.align_support import template as make_template


@pytest.fixture(scope="module")
def template(shared_data):
    return make_template(shared_data)


def _split(items):
    items = list(items)
    return [i for i in items if not isinstance(i, Quarantined)], [i for i in items if isinstance(i, Quarantined)]


def test_hh_rlhf_pairs_share_the_prompt_and_bad_dialogues_are_quarantined(shared_data):
    path = shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz"
    pairs, bad = _split(read_source(PreferenceSource(kind="hh_rlhf", path=str(path))))
    assert len(pairs) > 2200 and bad  # the real split has some malformed records
    assert set(Counter(q.error for q in bad)) <= {"bad_dialogue", "empty_content", "prompt_mismatch",
                                                  "identical_replies", "bad_turn_order"}
    with gzip.open(path, "rt") as handle:
        first = json.loads(handle.readline())
    pair = pairs[0]
    assert pair.prompt[-1]["role"] == "user" and pair.prompt[0]["role"] == "user"
    assert first["chosen"].endswith(pair.chosen) and first["rejected"].endswith(pair.rejected)
    assert pair.chosen != pair.rejected
    offsets = {q.offset for q in bad}
    assert all(p.id.rsplit(":", 1)[1] not in {str(o) for o in offsets} for p in pairs)


def test_hh_dialogue_parser_names_the_problem():
    assert parse_hh_dialogue("\n\nHuman: hi\n\nAssistant: hello", "x") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(RecordError, match="two Human turns"):
        parse_hh_dialogue("\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "chosen")
    with pytest.raises(RecordError, match="does not start"):
        parse_hh_dialogue("Assistant: hi", "chosen")


def test_oasst_pairs_prefer_the_better_ranked_sibling(shared_data):
    path = shared_data / "oasst1_en_100" / "en_100_tree.jsonl"
    ranks = {}
    for line in path.read_text().splitlines():
        stack = [json.loads(line)["prompt"]]
        while stack:
            node = stack.pop()
            ranks[node["text"]] = node.get("rank")
            stack.extend(node.get("replies") or [])
    pairs, bad = _split(read_source(PreferenceSource(kind="oasst", path=str(path))))
    assert len(pairs) > 100 and not bad
    assert all(ranks[p.chosen] < ranks[p.rejected] for p in pairs)
    assert all(p.prompt[-1]["role"] == "user" for p in pairs)
    assert len({p.id for p in pairs}) == len(pairs)


def test_user_preference_jsonl_formats_and_quarantine(tmp_path):
    prompt = [{"role": "user", "content": "Name a prime."}]
    lines = [
        json.dumps({"prompt": prompt, "chosen": "7", "rejected": "8"}),
        json.dumps({"prompt": prompt, "chosen": {"role": "assistant", "content": "3"},
                    "rejected": [{"role": "assistant", "content": "4"}]}),
        json.dumps({"prompt": prompt, "chosen": "7"}),
        json.dumps({"prompt": prompt + [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": prompt, "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": prompt, "chosen": {"role": "user", "content": "3"}, "rejected": "4"}),
        json.dumps({"prompt": prompt, "chosen": 5, "rejected": "4"}),
        json.dumps({"prompt": "text", "chosen": "a", "rejected": "b"}),
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, bad = _split(read_source(PreferenceSource(kind="preferences", path=str(path))))
    assert [(p.chosen, p.rejected) for p in pairs] == [("7", "8"), ("3", "4")]
    assert {q.offset: q.error for q in bad} == {3: "missing_field", 4: "bad_turn_order", 5: "identical_replies",
                                                6: "bad_role", 7: "wrong_type", 8: "wrong_type"}


def test_encoding_scores_only_the_final_reply_and_shortens_long_prompts(shared_data, template):
    path = shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz"
    pairs, _ = _split(read_source(PreferenceSource(kind="hh_rlhf", path=str(path), max_records=60)))
    rows, kept, stats = encode_pairs(pairs, template, seq_len=160, pad_id=2)
    assert stats.shortened > 0 and stats.pairs == len(kept) == len(rows)
    n = len(rows)
    for i, pair in enumerate(kept):
        for row, reply in ((i, pair.chosen), (i + n, pair.rejected)):
            ids = rows.tokens[row, :rows.lengths[row]]
            scored = ids[rows.completion[row, :rows.lengths[row]]].tolist()
            assert scored == template.encode_text(reply) + [template.end_id]
            assert ids[-len(scored) - 1] == template._ids["<|assistant|>"]
        assert rows.lengths[i] <= 161 and rows.lengths[i + n] <= 161
        # both sequences of a pair carry the same prompt tokens
        prompt_len = int(np.argmax(rows.completion[i]))
        assert np.array_equal(rows.tokens[i, :prompt_len], rows.tokens[i + n, :prompt_len])

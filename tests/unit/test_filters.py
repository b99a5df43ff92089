"""Heuristic filters on hand-written documents at and around each threshold.

Each rule is isolated by switching the group's other thresholds off, then checked with a document
measuring exactly the threshold (kept: the rules are strict inequalities, as published) and one
just past it (dropped, with the rule's name and the measured value).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmray.data.filters import heuristics as F


def only(cls, **kept):
    """A config of ``cls`` with every optional threshold off except ``kept``."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in kept:
            values[field.name] = kept[field.name]
        elif field.type.endswith("| None") if isinstance(field.type, str) else False:
            values[field.name] = None
    return cls(**values)


def verdict(group, text, cfg):
    return F.GROUPS[group](F.TextView(text), cfg)


def words(n, word="word"):
    return " ".join([word] * n)


# --- Gopher quality -----------------------------------------------------------------------------

def test_gopher_word_count_bounds():
    cfg = only(F.GopherQualityConfig, min_words=50, max_words=60)
    assert verdict("gopher_quality", words(50), cfg) is None
    assert verdict("gopher_quality", words(49), cfg) == ("too_few_words", 49)
    assert verdict("gopher_quality", words(60), cfg) is None
    assert verdict("gopher_quality", words(61), cfg) == ("too_many_words", 61)


def test_gopher_symbol_words_do_not_count_as_words():
    cfg = only(F.GopherQualityConfig, min_words=3)
    assert verdict("gopher_quality", "one , two ; ! ?", cfg) == ("too_few_words", 2)


def test_gopher_mean_word_length():
    cfg = only(F.GopherQualityConfig, min_mean_word_length=3, max_mean_word_length=10)
    assert verdict("gopher_quality", "abc abc", cfg) is None  # exactly 3
    assert verdict("gopher_quality", "abc ab", cfg) == ("mean_word_length_low", 2.5)
    assert verdict("gopher_quality", "abcdefghij abcdefghij", cfg) is None  # exactly 10
    assert verdict("gopher_quality", "abcdefghijk abcdefghij", cfg) == ("mean_word_length_high", 10.5)


def test_gopher_hash_and_ellipsis_ratio():
    cfg = only(F.GopherQualityConfig, max_symbol_word_ratio=0.1)
    # 9 words + 1 '#' token = 10 tokens, 1 hash: ratio 0.1 (kept); 2 hashes in 11 tokens: 0.18
    assert verdict("gopher_quality", words(9) + " #", cfg) is None
    assert verdict("gopher_quality", words(9) + " # #", cfg).reason == "hash_ratio"
    assert verdict("gopher_quality", words(9) + " …", cfg) is None
    assert verdict("gopher_quality", words(8) + " … …", cfg).reason == "ellipsis_ratio"


def test_gopher_bullet_and_trailing_ellipsis_lines():
    cfg = only(F.GopherQualityConfig, max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3)
    bullets = "\n".join(["- item"] * 9 + ["plain line"])
    assert verdict("gopher_quality", bullets, cfg) is None  # 0.9
    assert verdict("gopher_quality", "\n".join(["• item"] * 10), cfg) == ("bullet_lines_ratio", 1.0)
    ellipses = "\n".join(["and so..."] * 3 + ["done."] * 7)
    assert verdict("gopher_quality", ellipses, cfg) is None  # 0.3
    ellipses = "\n".join(["and so..."] * 4 + ["done."] * 6)
    assert verdict("gopher_quality", ellipses, cfg) == ("ellipsis_lines_ratio", 0.4)


def test_gopher_alpha_words_and_stop_words():
    cfg = only(F.GopherQualityConfig, min_alpha_words_ratio=0.8)
    assert verdict("gopher_quality", words(8) + " 12 34", cfg) is None  # 0.8
    assert verdict("gopher_quality", words(7) + " 12 34 56", cfg) == ("alpha_words_ratio", 0.7)
    cfg = only(F.GopherQualityConfig, min_stop_words=2)
    assert verdict("gopher_quality", "the cat and the dog", cfg) is None
    assert verdict("gopher_quality", "the cat the dog", cfg) == ("too_few_stop_words", 1)


# --- Gopher repetition --------------------------------------------------------------------------

def rep(**kept):
    return only(F.GopherRepetitionConfig, **{"top_ngram_max_frac": {}, "dup_ngram_max_frac": {}, **kept})


def test_duplicate_line_fraction():
    cfg = rep(max_dup_line_frac=0.3)
    lines = [f"line number {i}" for i in range(7)]
    assert verdict("gopher_repetition", "\n".join(lines + [lines[0]] * 3), cfg) is None  # 3/10
    value = verdict("gopher_repetition", "\n".join(lines[:6] + [lines[0]] * 4), cfg)
    assert value == ("dup_line_frac", 0.4)


def test_duplicate_paragraph_fraction_and_chars():
    cfg = rep(max_dup_para_frac=0.3)
    paragraphs = [f"paragraph {i}" for i in range(7)]
    assert verdict("gopher_repetition", "\n\n".join(paragraphs + [paragraphs[1]] * 3), cfg) is None
    assert verdict("gopher_repetition", "\n\n".join(paragraphs[:6] + [paragraphs[1]] * 4), cfg).reason == \
        "dup_para_frac"
    cfg = rep(max_dup_line_char_frac=0.2)
    # 4 unique lines of 9 chars + 1 repeat: 9 repeated chars / 49 chars = 0.18 (kept); 2 repeats: 0.31
    unique = [f"abcdefgh{i}" for i in range(4)]
    assert verdict("gopher_repetition", "\n".join(unique + unique[:1]), cfg) is None
    assert verdict("gopher_repetition", "\n".join(unique + unique[:2]), cfg).reason == "dup_line_char_frac"


def reference_duplicated_chars(words, n):
    """The plain sequential scan the vectorised version must equal."""
    seen, repeated, i = set(), 0, 0
    while i <= len(words) - n:
        gram = tuple(words[i:i + n])
        if gram in seen:
            repeated += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


def reference_top_chars(words, n):
    gram, count = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)[0]
    return (sum(map(len, gram)) + n - 1) * count


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "c", "dd", "e"]), min_size=0, max_size=80), st.integers(2, 10))
def test_ngram_helpers_equal_the_sequential_definitions(words, n):
    view = F.TextView(" ".join(words))
    assert view.words == words
    assert F._duplicated_ngram_chars(view, n) == reference_duplicated_chars(words, n)
    if len(words) >= n:
        assert F._top_ngram_chars(view, n) == reference_top_chars(words, n)


def test_top_ngram_fraction():
    cfg = rep(top_ngram_max_frac={"2": 0.2})
    varied = " ".join(f"w{i:03d}" for i in range(40))  # all 2-grams unique: top = one 2-gram
    assert verdict("gopher_repetition", varied, cfg) is None
    spam = "buy now " * 20 + varied
    result = verdict("gopher_repetition", spam, cfg)
    assert result.reason == "top_2gram_frac" and result.value > 0.2


def test_duplicated_ngram_fraction_counts_characters_of_repeats():
    assert F._duplicated_ngram_chars(F.TextView("a b c d e a b c d e"), 5) == 5
    assert F._duplicated_ngram_chars(F.TextView("a b c d e f"), 5) == 0
    cfg = rep(dup_ngram_max_frac={"5": 0.15})
    text = " ".join(f"w{i:03d}" for i in range(60))
    assert verdict("gopher_repetition", text, cfg) is None
    assert verdict("gopher_repetition", text + " " + text, cfg).reason == "dup_5gram_frac"


# --- C4 -----------------------------------------------------------------------------------------

SENTENCE = "This is a complete sentence."


def test_c4_keeps_punctuated_lines_and_counts_sentences():
    cfg = F.C4Config()
    view = F.TextView("\n".join([SENTENCE] * 5 + ["menu item", "Home About"]))
    assert F.c4(view, cfg) is None
    assert view.text == "\n".join([SENTENCE] * 5)  # lines without terminal punctuation removed
    assert F.c4(F.TextView("\n".join([SENTENCE] * 4 + ["no punctuation here"])), cfg) == \
        ("too_few_sentences", 4)


def test_c4_line_and_document_rules():
    cfg = F.C4Config()
    body = [SENTENCE] * 5
    view = F.TextView("\n".join(body + ["Please enable JavaScript to view this page.",
                                        "Read our privacy policy for details.", "Too short."]))
    assert F.c4(view, cfg) is None and view.text == "\n".join(body)
    assert F.c4(F.TextView("\n".join(body + ["Lorem ipsum dolor sit amet."])), cfg) == ("lorem_ipsum", 1.0)
    assert F.c4(F.TextView("\n".join(body + ["We wrote x = {1, 2} here."])), cfg) == ("curly_bracket", 1.0)
    assert F.c4(F.TextView("\n".join(body[:4] + ["Wiki citation[1] ends here."])), cfg) is None


def test_c4_without_terminal_punctuation_rule_counts_all_lines():
    cfg = F.C4Config(require_terminal_punctuation=False, min_sentences=5)
    assert F.c4(F.TextView("\n".join(["a line of words"] * 5)), cfg) is None
    assert F.count_sentences("One. Two! Three? four") == 4


# --- FineWeb ------------------------------------------------------------------------------------

def test_fineweb_line_punctuation_ratio():
    cfg = F.FineWebConfig(max_short_line_ratio=1.0, max_dup_line_char_ratio=1.0, max_newline_word_ratio=10)
    # 3 of 25 lines punctuated = 0.12 exactly (kept); 2 of 25 = 0.08 (dropped)
    lines = [f"a line without an end {i}" for i in range(22)]
    assert F.fineweb(F.TextView("\n".join(lines + ["Done."] * 3)), cfg) is None
    assert F.fineweb(F.TextView("\n".join(lines + ["x"] + ["Done."] * 2)), cfg) == ("line_punct_ratio", 0.08)


def test_fineweb_short_lines_duplicates_and_lists():
    cfg = F.FineWebConfig(min_line_punct_ratio=0.0, max_dup_line_char_ratio=1.0, max_newline_word_ratio=10)
    long_line = "this line is comfortably longer than thirty characters."
    assert F.fineweb(F.TextView("\n".join(["short."] * 2 + [long_line])), cfg) is None  # 0.667 <= 0.67
    assert F.fineweb(F.TextView("\n".join(["short."] * 3 + [long_line])), cfg).reason == "short_line_ratio"
    cfg = F.FineWebConfig(min_line_punct_ratio=0.0, max_short_line_ratio=1.0, max_newline_word_ratio=10)
    assert F.fineweb(F.TextView("\n".join([long_line, long_line])), cfg).reason == "dup_line_char_ratio"
    cfg = F.FineWebConfig(min_line_punct_ratio=0.0, max_short_line_ratio=1.0, max_dup_line_char_ratio=1.0)
    assert F.fineweb(F.TextView("\n".join(f"item{i}" for i in range(10))), cfg).reason == "newline_word_ratio"


# --- Code ---------------------------------------------------------------------------------------

def test_code_rules():
    cfg = F.CodeConfig(max_line_length=20, max_mean_line_length=100)
    assert F.code(F.TextView("x = 1\n" + "y" * 20), cfg) is None
    assert F.code(F.TextView("x = 1\n" + "y" * 21), cfg) == ("max_line_length", 21)
    cfg = F.CodeConfig()
    assert F.code(F.TextView("def f():\n    return 1\n"), cfg) is None
    assert F.code(F.TextView("{}\n" * 10 + "[](){};\n" * 10), cfg).reason == "alnum_fraction"
    assert F.code(F.TextView("# Code generated by protoc. DO NOT EDIT.\nx = 1\n"), cfg) == ("autogenerated", 1.0)


def test_filter_set_runs_groups_in_order_and_records_signals():
    cfg = F.FilterConfig()
    result = F.apply_filters("short text", cfg.groups_for("text"), cfg)
    assert (result.stage, result.reason) == ("gopher_repetition", "top_2gram_frac")  # first group
    assert result.signals["gopher_repetition.dup_line_frac"] == 0.0
    result = F.apply_filters("short text", ["gopher_quality", "gopher_repetition"], cfg)
    assert (result.stage, result.reason, result.value) == ("gopher_quality", "too_few_words", 2)
    assert cfg.groups_for("code") == ["code"]
    assert cfg.groups_for("text", ["gopher_quality"]) == ["gopher_quality"]
    with pytest.raises(ValueError, match="unknown filter group"):
        cfg.groups_for("text", ["gopher"])

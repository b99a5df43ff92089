"""Normalization (UTF-8 repair, NFC, controls, whitespace) and PII redaction on hand-written text."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from llmray.data.filters import normalize, pii


def test_decode_repairs_a_few_invalid_bytes_and_counts_them():
    text, invalid = normalize.decode("caf\u00e9 ok".encode() + b"\xff\xfe end")
    assert text.startswith("café ok") and text.endswith(" end") and invalid == 2
    assert normalize.decode("plain \ufffd stays".encode()) == ("plain \ufffd stays", 0)


def test_repair_surrogates():
    assert normalize.repair_surrogates("a\ud800b") == ("a\ufffdb", 1)
    assert normalize.repair_surrogates("fine") == ("fine", 0)


def test_normalize_nfc_controls_and_whitespace():
    decomposed = "Cafe\u0301"  # e + combining acute
    assert normalize.normalize(decomposed) == unicodedata.normalize("NFC", decomposed) == "Café"
    assert normalize.normalize("a\x00b\x1bc\u200bd\ufeff") == "abcd"
    assert normalize.normalize("line one   \r\nline\u00a0two\r\r\r\rthree\t \n\n\n") == \
        "line one\nline two\n\nthree"
    assert normalize.normalize("    indented code\n        kept") == "    indented code\n        kept"
    assert normalize.normalize(" \n\t\n") == ""


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalize_is_idempotent(text):
    once = normalize.normalize(normalize.repair_surrogates(text)[0])
    assert normalize.normalize(once) == once


def test_pii_placeholders_and_counts():
    cfg = pii.PIIConfig()
    text, counts = pii.redact("Write to jane.roe+news@mail.example.org or call (555) 123-4567 / +44 20 7946 0958; "
                              "server 192.168.1.10, v6 2001:db8::ff00:42:8329.", cfg)
    assert text == ("Write to <EMAIL> or call <PHONE> / <PHONE>; server <IP_ADDRESS>, v6 <IP_ADDRESS>.")
    assert counts == {"email": 1, "ip": 2, "phone": 2}


def test_pii_leaves_versions_years_times_and_scope_operators():
    cfg = pii.PIIConfig()
    text = "Python 3.11.2, version 1.2.3.4.5, in 2019 at 12:30, std::vector, id 1234567890, 999.999.999.999"
    assert pii.redact(text, cfg) == (text, {"email": 0, "ip": 0, "phone": 0})


def test_pii_kinds_can_be_switched_off():
    cfg = pii.PIIConfig(email=None)
    assert pii.redact("a@b.com 10.0.0.1", cfg) == ("a@b.com <IP_ADDRESS>", {"email": 0, "ip": 1, "phone": 0})
    assert pii.redact("a@b.com", pii.PIIConfig(enabled=False))[0] == "a@b.com"

"""Real text for the hostile inputs: lines of the C4 sample and the Common Crawl WARC of shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def c4_records(shared_data: Path) -> list[dict]:
    """The first 40 records of the C4 sample (real web text with ids made up from their order)."""
    with open(shared_data / "c4_sample" / "c4_demo.jsonl", "rb") as handle:
        return [{"id": f"c4-{i}", "text": json.loads(next(handle))["text"]} for i in range(40)]


@pytest.fixture(scope="session")
def warc_path(shared_data: Path) -> Path:
    return shared_data / "web_cc_warc" / "resiliparse_warcfile.warc.gz"


def jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)

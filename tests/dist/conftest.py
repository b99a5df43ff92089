"""Fixtures shared by the distributed equivalence tests."""

from __future__ import annotations

import pytest

from tests.train_support import stdlib_texts, write_byte_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Byte-level token shards of real standard-library text, written once for every test file."""
    return write_byte_shards(tmp_path_factory.mktemp("shards"), stdlib_texts(12))

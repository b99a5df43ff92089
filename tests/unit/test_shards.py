"""Token shard writer and manifest: rollover, checksums, and refusal of corrupt shards."""

from __future__ import annotations

import numpy as np
import pytest

from llmray import runs
from llmray.tokens import shards
from llmray.tokens.loader import TokenLoader
from tests.unit.shard_fixtures import write_positional_shards


def test_shards_roll_over_at_whole_documents_with_correct_counts(tmp_path):
    manifest = write_positional_shards(tmp_path, [40, 70, 30, 90, 10], shard_tokens=100)
    entry = manifest["splits"]["train"]
    assert [(s["path"], s["tokens"], s["documents"]) for s in entry["shards"]] == [
        ("train/000000.bin", 110, 2), ("train/000001.bin", 120, 2), ("train/000002.bin", 10, 1)]
    assert entry["tokens"] == 240 and entry["documents"] == 5
    assert entry["sources"] == {"s0": {"documents": 3, "tokens": 80}, "s1": {"documents": 2, "tokens": 160}}
    assert manifest["source_mixture"]["s1"] == {"tokens": 160, "fraction": round(160 / 240, 6)}
    dtype = np.dtype(manifest["dtype"])
    joined = np.concatenate([shards.open_shard(tmp_path / s["path"], dtype) for s in entry["shards"]])
    assert np.array_equal(joined, np.arange(240))
    for shard in entry["shards"]:
        assert runs.sha256_file(tmp_path / shard["path"]) == shard["sha256"]


def test_token_dtype_is_uint16_up_to_65536_ids():
    assert shards.token_dtype(65536) == np.dtype("<u2")
    assert shards.token_dtype(65537) == np.dtype("<u4")


def test_corrupt_shard_is_refused_with_its_name_and_both_checksums(tmp_path):
    manifest = write_positional_shards(tmp_path, [500, 500], shard_tokens=400)
    victim = tmp_path / manifest["splits"]["train"]["shards"][1]["path"]
    data = bytearray(victim.read_bytes())
    data[17] ^= 0xFF
    victim.write_bytes(bytes(data))
    expected = manifest["splits"]["train"]["shards"][1]["sha256"]
    with pytest.raises(shards.ShardError, match=rf"shard .*train/000001\.bin is corrupt: sha256 [0-9a-f]{{64}} "
                                                rf"does not match the manifest's {expected}"):
        TokenLoader(tmp_path, seq_len=16, batch_size=2)


def test_truncated_or_missing_shard_and_bad_manifest_are_refused(tmp_path):
    manifest = write_positional_shards(tmp_path, [300], shard_tokens=1000)
    shard = tmp_path / manifest["splits"]["train"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(shards.ShardError, match=r"000000\.bin has 1196 bytes; the manifest says 300 uint32"):
        TokenLoader(tmp_path, seq_len=16, batch_size=2, verify=False)
    shard.unlink()
    with pytest.raises(shards.ShardError, match="does not exist"):
        TokenLoader(tmp_path, seq_len=16, batch_size=2)
    with pytest.raises(shards.ShardError, match=r"split 'val' has no shards; splits with shards: \['train'\]"):
        TokenLoader(tmp_path, seq_len=16, batch_size=2, split="val")
    (tmp_path / shards.MANIFEST).write_text('{"format": "other"}')
    with pytest.raises(shards.ShardError, match="format is 'other', expected 'llmray-tokens/1'"):
        TokenLoader(tmp_path, seq_len=16, batch_size=2)


def test_aborted_writer_leaves_no_partial_shard(tmp_path):
    writer = shards.ShardWriter(tmp_path, "train", np.dtype("<u2"), shard_tokens=1000)
    writer.add(np.arange(10), "s")
    writer.abort()
    assert not list((tmp_path / "train").iterdir())

"""Locations: the same calls on a local folder and on a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest

from llmray import storage

LAYOUT = {"a.jsonl": b'{"text": "a"}\n', "b.txt": b"bee", "sub/c.jsonl": b"{}\n", "sub/deeper/d.jsonl": b"dd",
          "sub/e.json": b"[]"}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh folder: a local one, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("s3_bucket"), "root")


def populate(root: str) -> None:
    for rel, data in LAYOUT.items():
        storage.write_bytes(storage.join(root, rel), data)


def test_paths_stay_uris_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("s3://bucket/runs/") == "s3://bucket/runs"
    assert storage.join("s3://bucket/runs", "demo", "curate/") == "s3://bucket/runs/demo/curate"
    assert storage.normalize("runs") == str(tmp_path / "runs")
    assert storage.normalize("file:///data/x") == "/data/x"
    assert storage.is_remote("gs://b/k") and not storage.is_remote("/data") and not storage.is_remote("file:///d")
    assert storage.local_path("s3://b/k") is None and storage.name("s3://b/k/manifest.json") == "manifest.json"


def test_write_read_list_and_delete(root):
    populate(root)
    assert storage.list_files(root) == sorted((rel, len(data)) for rel, data in LAYOUT.items())
    assert storage.read_bytes(storage.join(root, "sub/deeper/d.jsonl")) == b"dd"
    assert storage.is_file(storage.join(root, "b.txt")) and storage.is_dir(storage.join(root, "sub"))
    assert not storage.exists(storage.join(root, "missing.txt"))
    storage.write_json(storage.join(root, "m.json"), {"b": 1, "a": [2]})
    assert json.loads(storage.read_text(storage.join(root, "m.json"))) == {"a": [2], "b": 1}
    storage.delete(storage.join(root, "sub"))
    assert [rel for rel, _ in storage.list_files(root)] == ["a.jsonl", "b.txt", "m.json"]
    storage.delete(root)
    assert storage.list_files(root) == [] and not storage.exists(root)


def test_a_failed_writer_leaves_neither_the_file_nor_its_temp(root):
    target = storage.join(root, "out", "data.bin")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        with storage.atomic_output(target) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("writer died")
    assert storage.read_bytes(target) == b"old"
    import pyarrow.fs as pafs

    filesystem, path = storage.resolve(storage.join(root, "out"))
    every = [i.base_name for i in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))]
    assert every == ["data.bin"], every  # no temp key or file left behind


@pytest.mark.parametrize("pattern, expected", [
    ("*.jsonl", ["a.jsonl"]),
    ("**/*.jsonl", ["a.jsonl", "sub/c.jsonl", "sub/deeper/d.jsonl"]),
    ("sub/*.json*", ["sub/c.jsonl", "sub/e.json"]),
    ("?.txt", ["b.txt"]),
    ("sub/[cd].jsonl", ["sub/c.jsonl"]),
])
def test_glob_matches_like_a_local_glob(root, pattern, expected):
    populate(root)
    assert storage.glob(storage.join(root, pattern)) == [storage.join(root, rel) for rel in expected]


def test_remote_fingerprint_follows_rewrites_without_reading_the_bytes(s3_bucket):
    folder = storage.join(s3_bucket, "corpus")
    populate(folder)
    first = storage.fingerprint(folder)
    assert first.startswith("stat:") and storage.fingerprint(folder) == first
    storage.write_bytes(storage.join(folder, "b.txt"), b"bees")
    assert storage.fingerprint(folder) != first
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.fingerprint(storage.join(s3_bucket, "nothing"))


def test_local_fingerprint_is_the_content_hash(tmp_path):
    populate(str(tmp_path / "a"))
    populate(str(tmp_path / "b"))
    assert storage.fingerprint(tmp_path / "a") == storage.fingerprint(tmp_path / "b")

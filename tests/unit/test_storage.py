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


def test_local_copy_downloads_once_per_version_and_never_exposes_a_partial_copy(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRAY_CACHE_DIR", str(tmp_path / "cache"))
    assert storage.local_copy(tmp_path / "here") == tmp_path / "here"  # a local location is used in place
    folder = storage.join(s3_bucket, "model")
    storage.write_bytes(storage.join(folder, "weights.bin"), b"w1")
    storage.write_bytes(storage.join(folder, "tok/vocab.json"), b"{}")
    copy = storage.local_copy(folder)
    assert copy.name == "model" and (copy / "weights.bin").read_bytes() == b"w1"
    assert (copy / "tok" / "vocab.json").read_bytes() == b"{}"
    (copy / "weights.bin").write_bytes(b"marker")  # a second call must not download again
    assert (storage.local_copy(folder) / "weights.bin").read_bytes() == b"marker"
    storage.write_bytes(storage.join(folder, "weights.bin"), b"w2-rewritten")  # a new version: a new copy
    assert (storage.local_copy(folder) / "weights.bin").read_bytes() == b"w2-rewritten"
    assert storage.local_copy(storage.join(folder, "weights.bin")).read_bytes() == b"w2-rewritten"

    def broken(location, target):
        target.mkdir(parents=True)
        (target / "half").write_bytes(b"x")
        raise ConnectionError("network dropped")

    storage.write_bytes(storage.join(s3_bucket, "other", "a"), b"a")
    monkeypatch.setattr(storage, "download", broken)
    with pytest.raises(ConnectionError):
        storage.local_copy(storage.join(s3_bucket, "other"))
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if "half" in p.name or storage.TEMP_MARK in p.name]
    assert leftovers == []
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        storage.local_copy(storage.join(s3_bucket, "missing"))


def test_upload_folder_writes_the_named_files_last(s3_bucket, tmp_path, monkeypatch):
    for rel in ("b/.metadata", "a.distcp", "z.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    written = []
    atomic_output = storage.atomic_output
    monkeypatch.setattr(storage, "atomic_output", lambda location: written.append(location) or atomic_output(location))
    storage.upload_folder(tmp_path, storage.join(s3_bucket, "ckpt"), last=(".metadata",))
    assert [w.rsplit("ckpt/", 1)[1] for w in written] == ["a.distcp", "z.pt", "b/.metadata"]
    assert storage.read_bytes(storage.join(s3_bucket, "ckpt", "b/.metadata")) == b"b/.metadata"

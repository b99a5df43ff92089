"""Where llmray reads and writes: a local path or a URI of any filesystem pyarrow opens.

Every run directory, source path, output and manifest is a *location*: a local path, or a URI
such as ``s3://bucket/runs`` or ``gs://bucket/corpus/*.jsonl.gz``. Design choices:

* **Plain strings.** Locations travel through configs, manifests and Ray task arguments as they
  are; ``pathlib.Path`` would turn ``s3://b/k`` into ``s3:/b/k``, a local folder (the bug this
  module exists to end). Local paths are made absolute, because Ray workers run elsewhere.
* **Filesystems from the URI.** ``pyarrow.fs.FileSystem.from_uri`` picks S3, GCS, HDFS...;
  credentials, region and endpoint come from the environment as those libraries expect
  (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...). Nothing
  here logs them. One filesystem per (scheme, bucket) per process.
* **Atomic writes everywhere.** Locally: a temp file beside the target, fsync, rename. On an object
  store: the bytes go to a hidden temp key (``.name.tmp-*``) and are moved onto the final key
  (a server-side copy) only when the writer finished, so a reader never sees half an object and
  a failed writer leaves no final key. Listings skip temp names.
* **A folder on an object store is a key prefix**; it "exists" once a key lies under it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

TEMP_MARK = ".tmp-"  # in the name of every file or key an unfinished writer holds
_CHUNK = 1 << 20
_GLOB_CHARS = set("*?[")


# ---------------------------------------------------------------------------------------------
# Locations as strings
# ---------------------------------------------------------------------------------------------

def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI of a non-local filesystem (``s3://``, ``gs://``, ...)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """A URI as given (without a trailing ``/``), or an absolute local path."""
    text = os.fspath(location)
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text.removeprefix("file://")).expanduser().absolute())


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for local paths and URIs alike."""
    text = normalize(base)
    for part in parts:
        text = f"{text.rstrip('/')}/{part.strip('/')}"
    return text


def name(location: str | os.PathLike) -> str:
    return normalize(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | os.PathLike) -> str:
    """The folder holding ``location``."""
    return normalize(location).rstrip("/").rsplit("/", 1)[0]


def local_path(location: str | os.PathLike) -> Path | None:
    """The local ``Path`` of ``location``, or None for a remote URI."""
    return None if is_remote(location) else Path(normalize(location))


@functools.lru_cache(maxsize=None)
def _remote_filesystem(root: str):
    import pyarrow.fs as pafs

    filesystem, _ = pafs.FileSystem.from_uri(root)
    return filesystem


def resolve(location: str | os.PathLike):
    """``(pyarrow filesystem, path inside it)`` of ``location``."""
    import pyarrow.fs as pafs

    text = normalize(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), text
    scheme, rest = text.split("://", 1)
    bucket = rest.split("/", 1)[0]
    return _remote_filesystem(f"{scheme}://{bucket}"), rest


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _info(location: str | os.PathLike):
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.Directory


def size(location: str | os.PathLike) -> int | None:
    """Bytes of the file at ``location``; None when no file is there (nothing, or a folder)."""
    return _info(location).size


def open_input(location: str | os.PathLike) -> IO[bytes]:
    """A seekable binary file object over ``location`` (a plain ``open`` for local paths)."""
    path = local_path(location)
    if path is not None:
        return open(path, "rb")
    filesystem, key = resolve(location)
    return filesystem.open_input_file(key)


def read_bytes(location: str | os.PathLike) -> bytes:
    with open_input(location) as handle:
        return handle.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def list_files(location: str | os.PathLike) -> list[tuple[str, int]]:
    """``(path relative to location, bytes)`` of every file under a folder, sorted; temp files of
    unfinished writers are left out. A missing folder has no files."""
    import pyarrow.fs as pafs

    filesystem, root = resolve(location)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    prefix = root.rstrip("/") + "/"
    return sorted((info.path[len(prefix):], info.size) for info in infos
                  if info.type == pafs.FileType.File and TEMP_MARK not in info.base_name)


def list_dirs(location: str | os.PathLike) -> list[str]:
    """Names of the folders directly under ``location``, sorted (none when it is missing)."""
    import pyarrow.fs as pafs

    filesystem, root = resolve(location)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in filesystem.get_file_info(pafs.FileSelector(root))
                  if info.type == pafs.FileType.Directory)


def glob(pattern: str) -> list[str]:
    """Locations matching ``pattern`` (``*`` and ``?`` within a name, ``[...]``, ``**`` across
    folders), sorted. Local patterns use :func:`glob.glob`; on an object store the longest prefix
    without a glob character is listed once and the keys are matched like local paths."""
    import glob as glob_lib

    if not is_remote(pattern):
        return sorted(normalize(m) for m in glob_lib.glob(os.path.expanduser(pattern), recursive=True))
    text = normalize(pattern)
    scheme, rest = text.split("://", 1)
    parts = rest.split("/")
    static = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    base = f"{scheme}://{'/'.join(parts[:static])}"
    if static == len(parts):
        return [text] if exists(text) else []
    matcher = _glob_regex("/".join(parts[static:]))
    return [join(base, rel) for rel, _ in list_files(base) if matcher.fullmatch(rel)]


def _glob_regex(pattern: str) -> re.Pattern:
    """The regex of a relative glob: ``**/`` any folders (or none), ``*``/``?`` within one name."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def fingerprint(location: str | os.PathLike) -> str:
    """Content fingerprint of a file or folder, for the lineage cache.

    Local: sha256 of the bytes (a folder: of its relative paths and file hashes). Remote: sha256
    of each file's relative path, size and modification time (``stat:`` prefix), because hashing
    an object store's contents would pull every byte through the process that asks; a rewrite of
    an object changes its modification time."""
    path = local_path(location)
    if path is not None:
        return _local_fingerprint(path)
    import pyarrow.fs as pafs

    filesystem, root = resolve(location)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"cannot fingerprint {location}: no such file or folder")
    infos = [info] if info.type == pafs.FileType.File else filesystem.get_file_info(
        pafs.FileSelector(root, recursive=True))
    digest = hashlib.sha256()
    for entry in sorted(infos, key=lambda i: i.path):
        if entry.type == pafs.FileType.File and TEMP_MARK not in entry.base_name:
            mtime = entry.mtime_ns if entry.mtime_ns is not None else 0
            digest.update(f"{entry.path[len(root):]}\0{entry.size}\0{mtime}\n".encode())
    return "stat:" + digest.hexdigest()


def cache_root() -> Path:
    """This node's cache of remote files: ``$LLMRAY_CACHE_DIR``, else ``~/.cache/llmray``."""
    return Path(os.environ.get("LLMRAY_CACHE_DIR") or Path.home() / ".cache" / "llmray").expanduser()


def local_copy(location: str | os.PathLike) -> Path:
    """A local path holding the bytes of ``location``, for libraries that read only local files
    (memory-mapped token shards, safetensors, DCP checkpoints, tokenizers).

    A local location is returned as it is. A remote file or folder is downloaded once per node
    into :func:`cache_root` under a key of its URI and :func:`fingerprint`, so a rewritten object
    is fetched again and an unchanged one never is; the copy is built in a temp folder and
    renamed into place whole, so concurrent workers on one node never see a partial copy. The
    cache is not pruned: it holds what this node's workers read."""
    path = local_path(location)
    if path is not None:
        return path
    uri = normalize(location)
    key = hashlib.sha256(f"{uri}\0{fingerprint(uri)}".encode()).hexdigest()[:32]
    objects = cache_root() / "objects"
    entry = objects / key
    if not entry.is_dir():
        objects.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}{TEMP_MARK}", dir=objects))
        try:
            download(uri, staging / name(uri))
            os.rename(staging, entry)
        except OSError:
            if not entry.is_dir():  # not a lost race with another worker of this node
                raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return entry / name(uri)


def download(location: str | os.PathLike, target: Path) -> None:
    """Copy a file, or every file under a folder, from ``location`` to the local ``target``."""
    if is_file(location):
        files = [("", None)]
    else:
        files = list_files(location)
        if not files and not is_dir(location):
            raise FileNotFoundError(f"cannot download {location}: no such file or folder")
    for rel, _ in files:
        destination = target / rel if rel else target
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open_input(join(location, rel) if rel else location) as source, open(destination, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)


def upload_folder(folder: Path, location: str | os.PathLike, last: tuple[str, ...] = ()) -> None:
    """Write every file under the local ``folder`` to ``location`` (each atomically); files named in
    ``last`` go after all others, so a reader that waits for them finds the rest complete."""
    files = sorted((p for p in Path(folder).rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
    for file in files:
        with open(file, "rb") as source, atomic_output(join(location, str(file.relative_to(folder)))) as out:
            shutil.copyfileobj(source, out, _CHUNK)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open_input(path) as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_fingerprint(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or directory")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and TEMP_MARK not in p.name):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file beside the local ``path``; on clean exit fsync it and rename it onto ``path``.

    On an exception (or a kill) the final path is untouched and the temp file is removed
    (or, after a kill, left as an ignorable ``.<name>.tmp-*`` file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output(location: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary stream whose bytes appear at ``location`` only if the block finishes."""
    path = local_path(location)
    if path is not None:
        with atomic_write(path, "wb") as handle:
            yield handle
        return
    filesystem, key = resolve(location)
    parent, _, base = key.rpartition("/")
    temp = f"{parent}/.{base}{TEMP_MARK}{uuid.uuid4().hex}"
    try:
        with filesystem.open_output_stream(temp) as handle:
            yield handle
        filesystem.move(temp, key)
    except BaseException:
        with contextlib.suppress(Exception):
            filesystem.delete_file(temp)
        raise


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    with atomic_output(location) as handle:
        handle.write(data)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str | os.PathLike, obj: Any) -> None:
    write_text(location, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_text(location: str | os.PathLike, text: str) -> None:
    """Add ``text`` at the end of a file, creating it. Locally: one ``write`` to a file opened for
    appending, so appenders in other processes never split each other's lines. An object cannot
    be appended to: it is read and written back whole (logs of tens of lines whose writers take
    turns)."""
    path = local_path(location)
    if path is None:
        write_text(location, (read_text(location) if exists(location) else "") + text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


@contextlib.contextmanager
def staged_folder(location: str | os.PathLike) -> Iterator[Path]:
    """A local folder whose files end up in ``location``: the folder itself when it is local,
    else a temp folder uploaded file by file when the block succeeds. For the small artifacts a
    process makes itself with libraries that only write local files (a report and its plots)."""
    path = local_path(location)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="llmray-staged-") as scratch:
        yield Path(scratch)
        upload_folder(Path(scratch), location)


def make_dirs(location: str | os.PathLike) -> None:
    """Create a local folder (and its parents); nothing to do on an object store."""
    path = local_path(location)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)


def delete(location: str | os.PathLike) -> None:
    """Remove a file or a whole folder (every key under a prefix); a missing one is fine."""
    import pyarrow.fs as pafs

    filesystem, path = resolve(location)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif kind == pafs.FileType.File:
        filesystem.delete_file(path)

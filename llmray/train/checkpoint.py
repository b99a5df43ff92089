"""Checkpoints: what a training state is on disk, when a checkpoint counts as complete, where they live.

A checkpoint is one directory ``step_<NNNNNNNN>/`` holding

* the engine's sharded model + optimizer state: ``torch.distributed.checkpoint`` files
  (``__<rank>_<n>.distcp`` + ``.metadata``) for torch/FSDP2, or DeepSpeed's own ZeRO files under
  ``deepspeed/`` for the DeepSpeed engine;
* one ``trainer_rank<r>.pt`` per rank: step, LR-scheduler state, data-loader state, RNG states
  and guard history (plain tensors and numbers, read back with ``weights_only=True``).

Every rank writes its ``trainer_rank<r>.pt`` *before* the engine's collective save, and DCP
writes ``.metadata`` only after all ranks' shards are written, so :func:`is_complete` can tell an
interrupted write from a finished one: every rank file present, the engine's metadata present
and every file it references present at its full length. Incomplete directories are never
restored; :func:`latest_complete` falls back to the newest complete one.

Where checkpoints live is a :class:`CheckpointStore`: :class:`LocalCheckpointStore` (a directory;
single process and torchrun-style runs) and :class:`ObjectStoreCheckpointStore` (one process
writing to ``s3://``, ``gs://``...) here, and the Ray Train store in ``ray_train.py`` that hands
each rank's directory to ``ray.train.report``. A checkpoint on an object store is read through a
node-local copy (:func:`llmray.storage.local_copy`): :func:`latest_in` finds the newest complete
one under a local folder or a URI alike.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Protocol

import torch
import torch.distributed as dist

from llmray import runs, storage
from llmray.parallel.deepspeed import DEEPSPEED_DIR

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def trainer_state_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"trainer_rank{rank}.pt"


def write_trainer_state(directory: Path, rank: int, state: dict) -> None:
    with runs.atomic_write(trainer_state_path(directory, rank), "wb", encoding=None) as handle:
        torch.save(state, handle)


def read_trainer_state(directory: Path, rank: int) -> dict:
    return torch.load(trainer_state_path(directory, rank), map_location="cpu", weights_only=True)


def is_complete(directory: Path) -> tuple[bool, str]:
    """Whether ``directory`` holds a fully written checkpoint, and if not, why."""
    directory = Path(directory)
    rank0 = trainer_state_path(directory, 0)
    if not rank0.is_file():
        return False, f"{rank0.name} is missing"
    try:
        world_size = int(read_trainer_state(directory, 0)["world_size"])
    except Exception as exc:  # noqa: BLE001 - any unreadable file means an incomplete checkpoint
        return False, f"{rank0.name} is unreadable ({type(exc).__name__}: {exc})"
    missing = [r for r in range(world_size) if not trainer_state_path(directory, r).is_file()]
    if missing:
        return False, f"trainer state of ranks {missing} is missing (world size {world_size})"
    if (directory / ".metadata").is_file():
        return _dcp_files_complete(directory)
    if (directory / DEEPSPEED_DIR / "latest").is_file():
        return _deepspeed_files_complete(directory / DEEPSPEED_DIR, world_size)
    return False, "no .metadata (torch.distributed.checkpoint) or deepspeed/latest: the write was interrupted"


def _dcp_files_complete(directory: Path) -> tuple[bool, str]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # noqa: BLE001
        return False, f".metadata is unreadable ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = directory / name
        if not path.is_file():
            return False, f"{name} referenced by .metadata is missing"
        if path.stat().st_size < size:
            return False, f"{name} is truncated ({path.stat().st_size} of {size} bytes)"
    return True, "complete"


def _deepspeed_files_complete(directory: Path, world_size: int) -> tuple[bool, str]:
    tag = (directory / "latest").read_text().strip()
    for rank in range(world_size):
        if not list((directory / tag).glob(f"*zero_pp_rank_{rank}_*optim_states.pt")):
            return False, f"deepspeed optimizer state of rank {rank} is missing under {directory / tag}"
    return True, "complete"


def step_names(root: str | Path) -> list[str]:
    """Names of the ``step_*`` folders under ``root`` (a local folder or a URI), newest first."""
    return sorted((n for n in storage.list_dirs(root) if STEP_DIR.match(n)), reverse=True)


def checkpoint_dirs(root: Path) -> list[Path]:
    """``step_*`` directories under the local ``root``, newest (highest step) first."""
    return [Path(root) / name for name in step_names(root)]


def latest_in(root: str | Path, log=None, newest: str | None = None) -> Path | None:
    """The newest complete checkpoint under ``root`` (a local folder or a URI) no newer than the
    step folder named ``newest``, as a local path. Remote ones are copied to this node one at a
    time, newest first, until a complete one is found."""
    names = [n for n in step_names(root) if newest is None or n <= newest]
    return latest_complete((storage.local_copy(storage.join(root, n)) for n in names), log)


def latest_complete(candidates: Iterable[Path], log=None) -> Path | None:
    """The first complete checkpoint among ``candidates`` (in order); incomplete ones are logged and skipped."""
    for path in candidates:
        ok, why = is_complete(path)
        if ok:
            return path
        if log is not None:
            log(f"ignoring incomplete checkpoint {path}: {why}")
    return None


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's model weights, at any saved world size, into a plain (unsharded) model.

    Used in the driver to export final weights, and by rank 0 alone for in-training evaluation
    (``no_dist``: no collective with the other ranks): DCP reshards on load; DeepSpeed ZeRO
    partitions are consolidated with DeepSpeed's own fp32 reconstruction.
    """
    directory = Path(directory)
    if (directory / ".metadata").is_file():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(model)}
        with warnings.catch_warnings():  # DCP notes that it loads in one process: that is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state, checkpoint_id=str(directory), no_dist=True)
        set_model_state_dict(model, state["model"])
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(directory / DEEPSPEED_DIR))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"output.weight"} if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{directory}: DeepSpeed weights do not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")


class CheckpointStore(Protocol):
    """Where checkpoints are written and found. Every rank calls every method, in the same order."""

    def staging_dir(self, step: int) -> Path:
        """The directory this rank writes checkpoint ``step`` into."""

    def commit(self, step: int, directory: Path, metrics: dict) -> None:
        """Publish the written checkpoint (and report ``metrics`` with it)."""

    def report(self, metrics: dict) -> None:
        """Report metrics without a checkpoint."""

    def latest(self) -> Path | None:
        """The newest complete checkpoint to resume from, or None."""


class LocalCheckpointStore:
    """Checkpoints as ``root/step_N`` on a filesystem every rank sees; keeps the newest ``num_to_keep``."""

    def __init__(self, root: Path, num_to_keep: int | None = None, log=None):
        self.root = Path(root)
        self.num_to_keep = num_to_keep
        self.log = log

    def staging_dir(self, step: int) -> Path:
        path = self.root / step_dir_name(step)
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        _barrier()
        return path

    def commit(self, step: int, directory: Path, metrics: dict) -> None:
        _barrier()
        if _rank() == 0 and self.num_to_keep:
            complete = [p for p in checkpoint_dirs(self.root) if is_complete(p)[0]]
            for old in complete[self.num_to_keep:]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def report(self, metrics: dict) -> None:
        pass

    def latest(self) -> Path | None:
        return latest_complete(checkpoint_dirs(self.root), self.log)


class ObjectStoreCheckpointStore:
    """Checkpoints as ``root/step_N`` on an object store, written by one process (the in-process
    launcher; Ray Train uploads its workers' own). Each is written to a node-local folder, then
    uploaded with the engine's metadata (``.metadata``, ``deepspeed/latest``) last, so a copy of an
    interrupted upload fails :func:`is_complete`; the newest ``num_to_keep`` step folders stay."""

    def __init__(self, root: str, num_to_keep: int | None = None, log=None):
        self.root = storage.normalize(root)
        self.num_to_keep = num_to_keep
        self.log = log

    def staging_dir(self, step: int) -> Path:
        return local_staging_dir(step)

    def commit(self, step: int, directory: Path, metrics: dict) -> None:
        target = storage.join(self.root, step_dir_name(step))
        try:
            storage.delete(target)  # what an interrupted earlier upload of this step left
            storage.upload_folder(directory, target, last=(".metadata", "latest"))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if self.num_to_keep:
            for old in step_names(self.root)[self.num_to_keep:]:
                storage.delete(storage.join(self.root, old))

    def report(self, metrics: dict) -> None:
        pass

    def latest(self) -> Path | None:
        return latest_in(self.root, self.log)


def local_staging_dir(step: int) -> Path:
    """A fresh node-local directory for one rank's part of checkpoint ``step``."""
    return Path(tempfile.mkdtemp(prefix=f"llmray-{step_dir_name(step)}-rank{_rank()}-"))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

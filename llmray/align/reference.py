"""Reference log-probs for DPO: computed once, in parallel on a Ray actor pool, cached with the data.

Why: DPO needs log π_ref(y|x) of every chosen and rejected reply. Computing them once before
training means the training workers hold only the policy model (half the memory, no second
forward per step), and a re-run with the same reference and the same pairs skips the pass.

* **Parallel pass**: ``actors`` Ray actors each load the reference checkpoint (HF layout, via
  :func:`llmray.model.hf.load`) once; sequences are sorted by length and cut into chunks of
  ``batch_size`` (little padding), which an :class:`ray.util.ActorPool` scores in order. The
  token arrays travel once through the object store. Actors take fractional CPUs
  (PITFALLS: whole-CPU actors can starve other tasks on small clusters) and, when asked, GPUs.
* **Cache key**: sha256 of the reference checkpoint (``config.json`` + weight files) and sha256
  of the encoded pairs (token ids + completion masks, so tokenizer, template, data, seq_len and
  truncation are all covered). Any change of either is a miss; the cache directory is
  ``<cache>/<ref16>-<data16>/`` holding ``reference_logps.npy`` and ``meta.json`` (the full
  hashes), written atomically.
* The scoring function (:func:`score_sequences`) is the same in-process and in the actors, and
  the test recomputes the cached values with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmray import runs, storage
from llmray.align.pairs import PairRows
from llmray.config import param
from llmray.progress import Progress

LOGPS_FILE = "reference_logps.npy"
META_FILE = "meta.json"
log = logging.getLogger("llmray.align.reference")


@dataclass
class ReferenceConfig:
    """The reference log-prob pass (an actor pool over the reference checkpoint)."""

    actors: int = param(2, doc="Ray actors scoring sequences, each holding the reference model", min=1)
    actor_cpus: float = param(0.5, doc="logical CPUs each actor reserves (fractional on small machines)",
                              min=0.01)
    actor_gpus: float = param(0.0, doc="GPUs each actor reserves (0 = score on CPU)", min=0.0)
    batch_size: int = param(16, doc="sequences per forward pass", min=1)
    cache_dir: str = param("{run_dir}/dpo/reference_cache",
                           doc="where cached reference log-probs live (shared across runs if pointed "
                               "at a common directory)")


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the model's config.json and weight files (names and :func:`llmray.storage.fingerprint`:
    their contents locally, size and modification time on an object store)."""
    names = [rel for rel, _ in storage.list_files(model_dir) if "/" not in rel and (
        rel == "config.json" or rel.endswith(".safetensors") or rel.endswith(".safetensors.index.json"))]
    if not any(name.endswith(".safetensors") for name in names):
        raise FileNotFoundError(f"{model_dir} holds no .safetensors weights: not a reference checkpoint")
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{storage.fingerprint(storage.join(model_dir, name))}\0".encode())
    return digest.hexdigest()


@torch.no_grad()
def score_sequences(model: torch.nn.Module, rows: PairRows, indices: np.ndarray) -> np.ndarray:
    """Summed completion log-probs (float64) of sequence rows ``indices``, in one forward pass."""
    from llmray.train.objectives import sequence_logps

    device = next(model.parameters()).device
    batch = rows.sequences(indices)
    logps = sequence_logps(model, torch.from_numpy(batch["inputs"]).to(device),
                           torch.from_numpy(batch["targets"]).to(device))
    return logps.double().cpu().numpy()


def length_sorted_chunks(rows: PairRows, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(rows.lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def score_in_process(model: torch.nn.Module, rows: PairRows, batch_size: int) -> np.ndarray:
    out = np.zeros(len(rows.lengths), dtype=np.float64)
    for chunk in length_sorted_chunks(rows, batch_size):
        out[chunk] = score_sequences(model, rows, chunk)
    return out


class _Scorer:
    """Ray actor body: the reference model, loaded once."""

    def __init__(self, model_dir: str, threads: int):
        from llmray.model import hf

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = hf.load(model_dir, device=device).model

    def score(self, rows: PairRows, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return indices, score_sequences(self.model, rows, indices)


def score_on_ray(model_dir: str | Path, rows: PairRows, cfg: ReferenceConfig) -> np.ndarray:
    """Reference log-probs of every sequence of ``rows`` on an actor pool (needs a connected Ray)."""
    import ray
    from ray.util import ActorPool

    threads = max(1, int(cfg.actor_cpus)) if cfg.actor_gpus == 0 else 1
    scorer = ray.remote(num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus)(_Scorer)
    actors = [scorer.remote(str(model_dir), threads) for _ in range(cfg.actors)]
    rows_ref = ray.put(PairRows(rows.tokens, rows.completion, rows.lengths, []))
    out = np.zeros(len(rows.lengths), dtype=np.float64)
    progress = Progress("dpo: reference log-probs", len(rows.lengths), "sequences", logger=log)
    try:
        pool = ActorPool(actors)
        for indices, logps in pool.map_unordered(lambda actor, chunk: actor.score.remote(rows_ref, chunk),
                                                 length_sorted_chunks(rows, cfg.batch_size)):
            out[indices] = logps
            progress.advance(len(indices))
        progress.finish()
    finally:
        for actor in actors:
            ray.kill(actor)
    return out


@dataclass
class CacheResult:
    logps: np.ndarray
    hit: bool
    directory: str


def cache_directory(cache_dir: str | Path, reference_sha: str, data_sha: str) -> str:
    return storage.join(cache_dir, f"{reference_sha[:16]}-{data_sha[:16]}")


def reference_logps(model_dir: str | Path, rows: PairRows, cfg: ReferenceConfig) -> CacheResult:
    """Cached reference log-probs of ``rows`` under the checkpoint at ``model_dir``; computes on a miss."""
    reference_sha, data_sha = checkpoint_fingerprint(model_dir), rows.fingerprint
    directory = cache_directory(cfg.cache_dir, reference_sha, data_sha)
    meta_path = storage.join(directory, META_FILE)
    if storage.is_file(meta_path):
        meta = json.loads(storage.read_text(meta_path))
        if meta.get("reference_sha256") == reference_sha and meta.get("data_sha256") == data_sha:
            logps = np.load(io.BytesIO(storage.read_bytes(storage.join(directory, LOGPS_FILE))), allow_pickle=False)
            if logps.shape == rows.lengths.shape:
                log.info("reference log-probs: cache hit %s", directory)
                return CacheResult(logps, True, directory)
    log.info("reference log-probs: computing %d sequences on %d actors", len(rows.lengths), cfg.actors)
    logps = score_on_ray(model_dir, rows, cfg)
    with runs.built_locally(directory, last=(META_FILE,)) as partial:
        with runs.atomic_write(partial / LOGPS_FILE, "wb", encoding=None) as handle:
            np.save(handle, logps, allow_pickle=False)
        runs.write_json(partial / META_FILE, {"reference_sha256": reference_sha, "data_sha256": data_sha,
                                              "reference": str(model_dir), "sequences": int(len(logps))})
    return CacheResult(logps, False, directory)

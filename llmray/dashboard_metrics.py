"""Publish stage metrics to Ray's metrics system (dashboard and Prometheus endpoint).

Why a separate path next to ``metrics.jsonl``: the JSONL file is the durable record used by the
report, while these gauges and counters are what an operator watches live on the Ray dashboard
or scrapes with Prometheus while a long curation or training run is in progress.

Three families, each with one fixed set of tags and its own prefix (Ray keeps the tag keys a
metric name was first registered with, in any process, and silently drops any other tag, so a
name must never be set with two tag sets):

* ``llmray_<key>{run, stage}``: every numeric value a stage logs on the driver
  (``llmray_docs_per_s``, ``llmray_final_reward_accuracy``).
* ``llmray_worker_<key>{run, stage, rank}``: set by every training worker, from its own process,
  at every logged step: ``llmray_worker_loss``, ``llmray_worker_tokens_per_s``,
  ``llmray_worker_mfu``, ``llmray_worker_memory_mb``, ``llmray_worker_step`` ... (loss and
  throughput are global, memory is the worker's own).
* ``llmray_docs_dropped_total{run, stage, reason}``: documents curation dropped, per reason,
  counted as the curated stream is written.

Outside a Ray process this is a no-op, so library code can call it unconditionally.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

_NAME = re.compile(r"[^a-zA-Z0-9_]")
_STAGE_TAGS = ("run", "stage")
_WORKER_TAGS = ("run", "stage", "rank")
_gauges: dict[str, Any] = {}
_counters: dict[str, Any] = {}


def _ray_ready() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def metric_name(key: str, prefix: str = "llmray_") -> str:
    return prefix + _NAME.sub("_", key)


def _set_gauges(prefix: str, tags: dict[str, str], values: dict[str, Any]) -> None:
    """One gauge ``<prefix><key>`` per finite numeric value (non-numeric values are ignored)."""
    if not _ray_ready():
        return
    from ray.util.metrics import Gauge

    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        name = metric_name(key, prefix)
        if name not in _gauges:
            _gauges[name] = Gauge(name, description=f"llmray metric '{key}'", tag_keys=tuple(tags))
        _gauges[name].set(float(value), tags=tags)


def publish(run: str, stage: str, values: dict[str, Any]) -> None:
    """Set ``llmray_<key>{run, stage}`` for each finite numeric value a stage logs."""
    _set_gauges("llmray_", dict(zip(_STAGE_TAGS, (run, stage))), values)


def publish_worker(run: str, stage: str, rank: int, step: int, values: dict[str, Any]) -> None:
    """Set ``llmray_worker_<key>{run, stage, rank}`` (and ``llmray_worker_step``) from a training worker."""
    _set_gauges("llmray_worker_", dict(zip(_WORKER_TAGS, (run, stage, str(rank)))), {"step": step, **values})


def count_dropped(run: str, stage: str, reason: str, count: int) -> None:
    """Add ``count`` dropped documents for ``reason`` to ``llmray_docs_dropped_total``."""
    if not _ray_ready() or count <= 0:
        return
    from ray.util.metrics import Counter

    name = "llmray_docs_dropped_total"
    if name not in _counters:
        _counters[name] = Counter(name, description="documents dropped by curation, per reason",
                                  tag_keys=(*_STAGE_TAGS, "reason"))
    _counters[name].inc(count, tags={"run": run, "stage": stage, "reason": reason})

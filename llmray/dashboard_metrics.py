"""Publish stage metrics to Ray's metrics system (dashboard and Prometheus endpoint).

Why a separate path next to ``metrics.jsonl``: the JSONL file is the durable record used by the
report, while these gauges and counters are what an operator watches live on the Ray dashboard
or scrapes with Prometheus while a long curation or training run is in progress.

Every numeric value a stage logs becomes a gauge ``llmray_<key>`` tagged with the run and stage
(``llmray_loss{stage="pretrain"}``, ``llmray_tokens_per_s``, ``llmray_docs_per_s``); counts of
dropped documents become the counter ``llmray_docs_dropped_total`` tagged with the reason. Outside a
Ray process this is a no-op, so library code can call it unconditionally.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

_NAME = re.compile(r"[^a-zA-Z0-9_]")
_TAG_KEYS = ("run", "stage")
_gauges: dict[str, Any] = {}
_counters: dict[str, Any] = {}


def _ray_ready() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def metric_name(key: str) -> str:
    return "llmray_" + _NAME.sub("_", key)


def publish(run: str, stage: str, values: dict[str, Any]) -> None:
    """Set one gauge per finite numeric value; non-numeric values are ignored."""
    if not _ray_ready():
        return
    from ray.util.metrics import Gauge

    tags = {"run": run, "stage": stage}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        name = metric_name(key)
        if name not in _gauges:
            _gauges[name] = Gauge(name, description=f"llmray stage metric '{key}'", tag_keys=_TAG_KEYS)
        _gauges[name].set(float(value), tags=tags)


def count_dropped(run: str, stage: str, reason: str, count: int) -> None:
    """Add ``count`` dropped documents for ``reason`` to ``llmray_docs_dropped_total``."""
    if not _ray_ready() or count <= 0:
        return
    from ray.util.metrics import Counter

    name = "llmray_docs_dropped_total"
    if name not in _counters:
        _counters[name] = Counter(name, description="documents dropped by curation, per reason",
                                  tag_keys=(*_TAG_KEYS, "reason"))
    _counters[name].inc(count, tags={"run": run, "stage": stage, "reason": reason})

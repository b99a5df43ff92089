"""``Dataset.repartition(target_num_rows_per_block=...)`` whose tasks ask for a given share of a CPU.

Why: in Ray Data 2.60 ``repartition`` takes no resource arguments and its tasks ask for 1 CPU.
Curate's classifier actors hold a fraction of a CPU for the whole stream, so on a 1-CPU node (a
small container, a 1-CPU cluster node) a 1-CPU repartition task never fits beside them and the
stage hangs with "1.5/1 CPU" requested (measured). The logical operator has a ``ray_remote_args``
field that the public method leaves empty; this sets it. A repartition asking for the same CPUs
as the ``map_batches`` before it is also fused into that map's tasks (no separate pass).
Ray is pinned to 2.60.x, whose internal operator this builds.
"""

from __future__ import annotations

from typing import Any


def repartition_rows(dataset: Any, rows: int, num_cpus: float, strict: bool = False) -> Any:
    """``dataset.repartition(target_num_rows_per_block=rows, strict=strict)``, its tasks asking for
    ``num_cpus`` CPUs."""
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import StreamingRepartition
    from ray.data.dataset import Dataset

    op = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[dataset._logical_plan.dag],
                              strict=strict, ray_remote_args={"num_cpus": num_cpus})
    return Dataset._from_parent(dataset, LogicalPlan(op, dataset.context))

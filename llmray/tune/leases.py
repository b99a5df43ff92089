"""Exclusive leases on a sweep's lineage slots, good across the whole cluster.

Trials that share upstream settings meet in the same slot (:mod:`llmray.tune.trial`) and must not
compute one stage twice at once. Trials run on any node and a slot may be a prefix on an object
store, so a file lock cannot do it: one named actor per sweep, started by the sweep's driver
for the length of the sweep, holds every lease. A lease lasts ``ttl_s``; its holder renews it
from a thread while the stage runs, so a holder that dies with its node or process lets the
lease lapse and a waiting trial goes on instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import uuid
from typing import Iterator

log = logging.getLogger("llmray.tune")
TTL_S = 60.0
_RETRY_S = 0.5


class SlotLeases:
    """Who holds which slot, until when (the body of the named actor; plain Python)."""

    def __init__(self) -> None:
        self._holders: dict[str, tuple[str, float]] = {}

    def take(self, slot: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease on ``slot`` for ``ttl_s``; False while another holder's is alive."""
        now = time.monotonic()
        current = self._holders.get(slot)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._holders[slot] = (holder, now + ttl_s)
        return True

    def give_back(self, slot: str, holder: str) -> None:
        if self._holders.get(slot, ("", 0.0))[0] == holder:
            del self._holders[slot]


def actor_name(sweep: str) -> str:
    """The lease actor's name for the sweep whose work folder is ``sweep``."""
    return "llmray-tune-leases-" + hashlib.sha256(sweep.encode()).hexdigest()[:16]


@contextlib.contextmanager
def serving(name: str) -> Iterator[None]:
    """The lease actor ``name`` for the block (the sweep); trials look it up by name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node, which the sweep cannot outlive anyway; restarted (empty: holders take
    # their leases again at the next renewal) if its process dies.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(SlotLeases).options(name=name, get_if_exists=True, num_cpus=0, max_restarts=-1,
                                           max_task_retries=-1, scheduling_strategy=here).remote()
    try:
        yield
    finally:
        ray.kill(actor)


@contextlib.contextmanager
def leased(name: str, slot: str, ttl_s: float = TTL_S) -> Iterator[None]:
    """Hold the lease on ``slot`` from the lease actor ``name`` for the block, waiting while
    another trial holds it."""
    import ray

    leases, holder = ray.get_actor(name), uuid.uuid4().hex
    if not ray.get(leases.take.remote(slot, holder, ttl_s)):
        log.info("waiting for %s: another trial is running that stage", slot)
        while not ray.get(leases.take.remote(slot, holder, ttl_s)):
            time.sleep(_RETRY_S)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 4):
            try:
                if not ray.get(leases.take.remote(slot, holder, ttl_s)):
                    log.error("lost the lease on %s (not renewed for %.0f s): another trial may run this "
                              "stage at the same time", slot, ttl_s)
            except ray.exceptions.RayError as exc:  # the lease actor restarting: try again next time
                log.warning("could not renew the lease on %s (%s); retrying", slot, exc)

    thread = threading.Thread(target=renew, name="llmray-slot-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            ray.get(leases.give_back.remote(slot, holder))
        except ray.exceptions.RayError as exc:  # the lease lapses by itself; the stage's outcome stands
            log.warning("could not give back the lease on %s (%s)", slot, exc)

"""Produce an iterator's items on a background thread, a few ahead of the consumer.

Used where one process alternates Python work that holds the GIL (reading and parsing records)
with native work that releases it (the tokenizer's Rust threads): reading the next batch while
the current one is encoded fills the gaps in which only one core was busy.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of ``items`` in order, produced by a thread at most ``depth`` ahead. An
    exception in the producer is raised here, in the consumer; closing this iterator early
    stops the producer after the item it is producing."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((_END, exc))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()

"""read_ahead: order kept, producer errors raised in the consumer, early close stops the producer."""

from __future__ import annotations

import threading
import time

import pytest

from llmray.read_ahead import read_ahead


def test_items_in_order_and_produced_ahead_on_another_thread():
    producers = []

    def items():
        for i in range(50):
            producers.append(threading.current_thread().name)
            yield i

    assert list(read_ahead(items(), depth=3)) == list(range(50))
    assert set(producers) == {"read-ahead"}


def test_producer_error_is_raised_in_the_consumer_after_the_good_items():
    def items():
        yield 1
        yield 2
        raise ValueError("bad record at line 3")

    got = []
    with pytest.raises(ValueError, match="bad record at line 3"):
        for item in read_ahead(items()):
            got.append(item)
    assert got == [1, 2]


def test_closing_early_stops_the_producer():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    iterator = read_ahead(items(), depth=2)
    assert next(iterator) == 0
    iterator.close()  # joins the producer thread
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count <= 5
    assert not any(t.name == "read-ahead" for t in threading.enumerate())

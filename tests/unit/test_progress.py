"""Progress lines: quiet for quick phases, then done/total, rate and ETA at most every interval."""

from __future__ import annotations

import logging

from llmray.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_quick_phase_prints_nothing(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="llmray.progress"):
        progress = Progress("dedup: exact duplicates", 8, "tasks", interval=10, clock=clock)
        clock.now += 3
        progress.advance(8)
        progress.finish()
    assert caplog.messages == []


def test_a_long_phase_prints_rate_and_eta_then_a_closing_line(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="llmray.progress"):
        progress = Progress("tokenizer: reading the sample into BPE", 5_000_000, "chars", interval=10, clock=clock)
        clock.now += 10
        progress.advance(1_000_000)  # 100k chars/s, 4M left
        clock.now += 5
        progress.advance(1_000_000)  # under the interval: no line
        clock.now += 25
        progress.advance(3_000_000)
        progress.finish("computing the merges")
    assert caplog.messages == [
        "tokenizer: reading the sample into BPE: 1.0M/5.0M chars (20%) | 100.0k chars/s | ETA 40s | 10s elapsed",
        "tokenizer: reading the sample into BPE: 5.0M/5.0M chars (100%) | 125.0k chars/s | ETA 0s | 40s elapsed",
        "tokenizer: reading the sample into BPE: done, 5.0M chars in 40s (125.0k chars/s); computing the merges",
    ]


def test_without_a_total_the_line_has_a_rate_and_no_eta():
    clock = Clock()
    progress = Progress("dedup: connected components", unit="rounds", clock=clock)
    clock.now += 90
    progress.advance(3)
    assert progress.line() == "dedup: connected components: 3 rounds | 30s per round | 1m30s elapsed"

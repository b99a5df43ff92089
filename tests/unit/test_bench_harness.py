"""The benchmark harness rule: every bench script (one that takes ``--quick``) ends with a JSON line
carrying ``bench/_load.LoadWatch``'s fields, and ``idle`` is false once any load sample exceeded
1.5x the cores the bench uses."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Modules named ``_*.py`` are helpers the scripts import, not benches.
SCRIPTS = sorted(p for p in BENCH.glob("[!_]*.py") if "--quick" in p.read_text())


@pytest.fixture
def load_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("_load", None)
    import _load

    monkeypatch.setattr(_load, "SAMPLE_SECONDS", 0.01)
    return _load


def test_there_are_bench_scripts_and_each_reports_the_load_fields():
    assert len(SCRIPTS) >= 10, [p.name for p in SCRIPTS]
    for script in SCRIPTS:
        text = script.read_text()
        watch = re.search(r"(\w+) = LoadWatch\(", text)
        assert "from _load import LoadWatch" in text and watch, script.name
        assert f"**{watch.group(1)}.fields()" in text, script.name  # spread into the last JSON line


def test_a_load_spike_during_the_run_marks_it_not_idle(load_module, monkeypatch):
    import time

    samples = iter([0.5] + [0.5] * 3 + [7.0] + [0.5] * 10_000)
    monkeypatch.setattr(load_module.os, "getloadavg", lambda: (next(samples), 0.0, 0.0))
    watch = load_module.LoadWatch(cores_used=2)
    deadline = time.time() + 5
    while watch.highest < 7.0 and time.time() < deadline:
        time.sleep(0.01)
    fields = watch.fields()
    assert (fields["loadavg_before"], fields["loadavg_after"], fields["loadavg_max"]) == (0.5, 0.5, 7.0)
    assert fields["idle"] is False and fields["cores_used"] == 2


def test_a_quiet_run_is_idle_and_says_what_it_ran_on(load_module, monkeypatch):
    monkeypatch.setattr(load_module.os, "getloadavg", lambda: (2.9, 0.0, 0.0))
    fields = load_module.LoadWatch(cores_used=2).fields()
    assert fields["idle"] is True and fields["loadavg_max"] == 2.9
    assert fields["machine"]["cpu"] and fields["machine"]["cores"] >= 1
    assert fields["versions"]["python"] and "torch" in fields["versions"]


BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def test_cpu_taken_by_other_processes_marks_the_run_not_idle_but_the_bench_s_own_children_do_not(
        load_module, monkeypatch):
    """The load average counts the bench's own threads too; the CPU time of processes outside its
    process tree does not: a busy child is the bench's own work, a busy stranger is competition."""
    import subprocess
    import time

    monkeypatch.setattr(load_module, "SAMPLE_SECONDS", 0.2)
    monkeypatch.setattr(load_module.os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    watch = load_module.LoadWatch(cores_used=2)
    subprocess.run([sys.executable, "-c", BUSY.format(seconds=1.5)], check=True)  # our own child
    own = watch.fields()
    assert own["others_cpu_cores"] < load_module.OTHERS_CPU_LIMIT and own["idle"] is True
    watch = load_module.LoadWatch(cores_used=2)
    # a stranger: started through a shell that exits at once, so init adopts it (outside our tree)
    subprocess.run(["sh", "-c", f"{sys.executable} -c '{BUSY.format(seconds=1.5)}' >/dev/null 2>&1 &"], check=True)
    time.sleep(1.5)
    foreign = watch.fields()
    assert foreign["others_cpu_cores"] > 0.5 and foreign["idle"] is False

"""Per-trial stage lineage: which stages each trial ran and which it reused from the cache.

A data ablation is worth running on a laptop only if trials that share a setting share its
work: two trials with the same curation thresholds must curate once. The trial runner records,
per stage, the lineage key and whether ``run_stage`` ran it or found it complete and unchanged
(``trials/<id>/trial.json``); this module turns those records into the sweep's ``lineage.json``
and ``lineage.md``, so the reuse is visible (and tested) rather than assumed.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmray import runs, storage
from llmray.tune.trial import TRIAL_RECORD, TRIALS


def lineage(work: Path | str, trial_ids: list[str]) -> dict:
    """``{"trials": {id: record}, "stages": {name: {"keys": n, "ran": n, "reused": n}}}``."""
    trials, stages = {}, {}
    for trial_id in trial_ids:
        trial_dir = runs.at(work, TRIALS, trial_id)
        path = runs.at(trial_dir, TRIAL_RECORD)
        if not storage.is_file(path):
            continue
        record = json.loads(storage.read_text(path))
        attempts = runs.at(trial_dir, "attempts.jsonl")
        record["attempts"] = len(storage.read_text(attempts).splitlines()) if storage.is_file(attempts) else 0
        trials[trial_id] = record
        for run in record["stages"]:
            entry = stages.setdefault(run["name"], {"keys": set(), "ran": 0, "reused": 0})
            entry["keys"].add(run["key"])
            entry["reused" if run["reused"] else "ran"] += 1
    return {"trials": trials,
            "stages": {name: {**entry, "keys": len(entry["keys"])} for name, entry in stages.items()}}


def lineage_markdown(data: dict) -> str:
    if not data["trials"]:
        return "No trial records.\n"
    names = list(data["stages"])
    lines = ["| trial | attempts | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for trial_id, record in data["trials"].items():
        done = {run["name"]: run for run in record["stages"]}
        cells = []
        for name in names:
            run = done.get(name)
            cells.append("" if run is None else
                         f"{'reused' if run['reused'] else 'ran'} `{run['key'][:8]}` ({run['seconds']:.1f} s)")
        lines.append(f"| {trial_id} | {record['attempts']} | " + " | ".join(cells) + " |")
    totals = ", ".join(f"{name}: {s['ran']} ran / {s['reused']} reused ({s['keys']} distinct)"
                       for name, s in data["stages"].items())
    return "\n".join(lines) + f"\n\nStage runs: {totals}.\n"

"""Stages run unchanged as Ray jobs: `ray job submit` against a real head with token auth."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import _ray_cli

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def _documents(tmp_path: Path) -> Path:
    """A small JSONL of real English prose (pydoc topics ship with every Python)."""
    from pydoc_data.topics import topics

    path = tmp_path / "docs.jsonl"
    with open(path, "w") as handle:
        for name in sorted(topics)[:40]:
            handle.write(json.dumps({"id": name, "text": topics[name], "source": "pydoc"}) + "\n")
    return path


AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 120


def _submit(head, *job_args: str) -> subprocess.CompletedProcess:
    """``ray job submit``, retried while the head answers that its job agent has not registered
    yet: the dashboard comes up before the agent, later still on a loaded machine, and Ray's
    answer is to try again."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        done = subprocess.run(
            [_ray_cli(), "job", "submit", "--working-dir", str(REPO), "--", "python", *job_args],
            env=head.env, capture_output=True, text=True, timeout=400)
        if AGENT_NOT_READY not in done.stderr + done.stdout or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_jobs_api_refuses_requests_without_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code == 401


def test_stage_job_succeeds_and_invalid_config_job_fails(ray_head, tmp_path):
    docs = _documents(tmp_path)
    runs_dir = tmp_path / "runs"
    common = ["--runs-dir", str(runs_dir), "--run", "job", f"documents={docs}", "vocab_size=400",
              "char_budget=20000", "report_chars=5000", "min_frequency=1"]
    good = _submit(ray_head, "jobs/tokenizer.py", *common)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert "succeeded" in (good.stdout + good.stderr)
    job_id = next(line.split("'")[1] for line in (good.stdout + good.stderr).splitlines()
                  if "Job '" in line and "succeeded" in line)
    logs = subprocess.run([_ray_cli(), "job", "logs", job_id], env=ray_head.env, capture_output=True,
                          text=True, timeout=60)
    assert "tokenizer" in logs.stdout and "outputs:" in logs.stdout
    assert (runs_dir / "job" / "tokenizer" / "output" / "tokenizer.json").is_file()
    manifest = json.loads((runs_dir / "job" / "tokenizer" / "manifest.json").read_text())
    assert manifest["status"] == "complete"

    bad = _submit(ray_head, "jobs/tokenizer.py", *common, "vocab_sise=400")
    assert bad.returncode != 0
    output = bad.stdout + bad.stderr
    assert "failed" in output.lower()
    assert "unknown config key 'vocab_sise'; did you mean 'vocab_size'?" in output

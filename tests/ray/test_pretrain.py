"""`llmray pretrain` on Ray Train: real `llmray tokens` output, fault tolerance, clear failure, observability.

The token shards come from the real tokenizer and tokens stages run on Python standard-library
sources of this machine. Every run uses 2 FSDP2 workers with 1 CPU and 1 thread each (the whole
2-CPU test cluster), except the observed run, whose workers leave half a CPU to its in-training
evaluation.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
from ray import cloudpickle

from llmray import config as config_lib
from llmray import stages, storage
from llmray.model import hf
from llmray.tokenizer import train as tokenizer_train
from llmray.tokens import shards as shards_lib
from llmray.tokens.tokenize import TokensConfig
from llmray.train import ray_train
from llmray.train.launch import launch
from llmray.train.pretrain import PretrainConfig, pretrain_job
from tests.ray.test_dashboard_metrics import metrics_url

pytestmark = pytest.mark.ray
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the kill hook travels to the workers


@pytest.fixture(scope="module")
def token_run(ray_session, tmp_path_factory):
    """A run directory whose tokenizer and tokens stages ran on real text."""
    return make_token_run(tmp_path_factory.mktemp("pretrain") / "run")


def token_shards_on_s3(run: Path, bucket: str) -> tuple[str, str]:
    """The locations of the tokens and tokenizer of ``run``, copied to ``bucket``."""
    tokens, tokenizer = storage.join(bucket, "tokens"), storage.join(bucket, "tokenizer")
    storage.upload_folder(run / "tokens" / "output", tokens)
    storage.upload_folder(run / "tokenizer" / "output", tokenizer)
    return tokens, tokenizer


def make_token_run(root: Path) -> Path:
    corpus = root.parent / "corpus"
    corpus.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with open(corpus / "stdlib.jsonl", "w", encoding="utf-8") as handle:
        for path in sorted(stdlib.glob("[a-m]*.py"))[:60]:
            handle.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace"),
                                     "source": "stdlib"}) + "\n")
    tok_cfg = tokenizer_train.TokenizerConfig(documents=str(corpus), vocab_size=512, char_budget=400_000,
                                              val_fraction=0.1, report_chars=2000)
    stages.run_stage(stages.STAGES["tokenizer"], tok_cfg, root)
    tokens_cfg = TokensConfig(documents=str(corpus), tokenizer=str(root / "tokenizer" / "output"),
                              shard_tokens=50_000, actors=1)
    stages.run_stage(stages.STAGES["tokens"], tokens_cfg, root)
    return root


def pretrain_config(root: Path, *overrides: str) -> PretrainConfig:
    raw = config_lib.apply_overrides(config_lib.read_yaml(CONFIGS / "tiny.yaml"), list(overrides))
    return stages.build_config(stages.STAGES["pretrain"], raw, root)


def test_pretrain_stage_trains_on_real_token_shards(token_run):
    cfg = pretrain_config(token_run, "train.steps=12", "train.log_every=2", "train.eval_every=6",
                          "train.checkpoint_every=6")
    result = stages.run_stage(stages.STAGES["pretrain"], cfg, token_run)
    summary = result.manifest["summary"]
    assert summary["steps"] == 12 and summary["checkpoint"].endswith("step_00000012")
    lines = [json.loads(x) for x in (token_run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in lines}
    assert losses[12] < losses[2] - 0.5  # learning
    last = lines[-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "memory_mb", "val_loss", "val_bpb"):
        assert key in last, key
    assert 0 < last["val_bpb"] < 10
    assert list((token_run / "pretrain" / "tensorboard").iterdir())
    exported = hf.load(result.output / "model")  # HF layout with the tokenizer copied in
    assert exported.config.vocab_size == cfg.model.vocab_size
    assert (result.output / "model" / "tokenizer.json").is_file()


class GaugeProbe:
    """Rank 0 at ``step``: poll the node's Prometheus endpoint until this worker's loss gauge shows the
    step's loss. Training waits meanwhile, so whatever is seen was published while the run was in
    progress; ``history`` (returned in rank 0's report) says what was seen."""

    def __init__(self, url: str, run: str, step: int):
        self.url, self.run, self.step = url, run, step
        self.history: list[dict] = []

    def __call__(self, step, metrics):
        import ray.train

        if step != self.step or ray.train.get_context().get_world_rank() != 0:
            return
        seen, deadline = None, time.time() + 60  # Ray's agent exports every ~10 s
        while time.time() < deadline and (seen is None or abs(seen - metrics["loss"]) > 1e-6):
            for line in urllib.request.urlopen(self.url, timeout=10).read().decode().splitlines():
                if line.startswith("ray_llmray_worker_loss{") and f'run="{self.run}"' in line and 'rank="0"' in line:
                    seen = float(line.rsplit(" ", 1)[1])
            time.sleep(1)
        self.history.append({"step": step, "loss": metrics["loss"], "seen": seen})


def test_a_run_is_observable_while_it_trains(token_run, shared_data, tmp_path, capfd):
    """Live worker gauges, one console line per logged step and no Ray Train result dicts, and
    in-training evaluation results in metrics.jsonl, from one Ray Train run."""
    raw = config_lib.apply_overrides(config_lib.read_yaml(CONFIGS / "tiny.yaml"), [
        "train.steps=4", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2",
        "execution.cpus_per_worker=0.75"])
    raw["eval"] = {"every": 2, "data_dir": str(shared_data), "limit": 5, "bootstrap_iters": 10,
                   "task_specs": {"copa": {"format": "icl_mc", "path": "copa/copa.jsonl"}},
                   "runner": {"num_actors": 0, "num_cpus_per_actor": 0.5}}
    cfg = stages.build_config(stages.STAGES["pretrain"], raw, token_run)
    run = f"observed-{os.getpid()}"
    probe = GaugeProbe(metrics_url(), run, step=2)
    job = pretrain_job(cfg, tmp_path / "checkpoints", tmp_path / "metrics.jsonl", hooks=[lambda trainer: probe],
                       tags={"run": run, "stage": "pretrain"}, evaluation_dir=tmp_path / "evals")
    result = launch(job, connect_ray=lambda: None)

    (seen,) = result.worker["hooks"][0]
    assert seen["seen"] == pytest.approx(seen["loss"], rel=1e-6)  # the worker's gauge, before the run ended
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]
    evaluated = {m["step"]: m for m in lines if "eval/copa/acc" in m}
    assert sorted(evaluated) == [2, 4] and [e["step"] for e in result.evaluations] == sorted(evaluated)
    assert 0 <= evaluated[4]["eval/copa/acc"] <= 1 and "eval/core" in evaluated[4]
    assert (tmp_path / "evals" / "step_00000004" / "results.json").is_file()
    assert not list((tmp_path / "evals" / "weights").iterdir())  # exported weights go once scored

    console = ""
    deadline = time.time() + 30  # worker output reaches the driver through Ray's log monitor
    while time.time() < deadline and not re.search(r"step 4 \| loss", console):
        console += capfd.readouterr().err
        time.sleep(0.5)
    for step in (1, 2, 3, 4):
        assert len(re.findall(rf"step {step} \| loss", console)) == 1, (step, console)
    for step in (2, 4):
        assert len(re.findall(rf"step {step} eval \| core -?[0-9.]+ \| copa/acc", console)) == 1, (step, console)
    assert "Reporting training result" not in console and "TrainingReport(" not in console


class KillOnce:
    """SIGKILL rank 1 right after step ``step`` the first time it gets there (marker file)."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def __call__(self, step, metrics):
        import ray.train

        if step == self.step and ray.train.get_context().get_world_rank() == 1 and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def run_direct(token_run, tmp_path, name, hooks=(), max_failures=1):
    cfg = pretrain_config(token_run, "train.steps=10", "train.log_every=1", "train.eval_every=0",
                          "train.checkpoint_every=4", f"execution.max_failures={max_failures}")
    metrics = tmp_path / f"{name}.jsonl"
    launch(pretrain_job(cfg, tmp_path / "ray" / name, metrics, hooks=hooks), connect_ray=lambda: None)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    return lines


def kill_once(step: int, marker: Path):
    """A hook factory: every worker gets a :class:`KillOnce` hook."""
    return lambda trainer: KillOnce(step, marker)


def test_killed_worker_restores_from_checkpoint_and_matches_the_clean_run(token_run, tmp_path):
    clean = {m["step"]: m["loss"] for m in run_direct(token_run, tmp_path, "clean")}
    lines = run_direct(token_run, tmp_path, "killed", hooks=[kill_once(6, tmp_path / "killed.marker")])
    assert (tmp_path / "killed.marker").exists()
    steps = [m["step"] for m in lines]
    assert steps.count(5) == 2  # steps after the step-4 checkpoint were trained again
    recovered = {m["step"]: m["loss"] for m in lines}  # the last computation of each step
    assert sorted(recovered) == list(range(1, 11))
    assert recovered == clean


def test_max_failures_zero_fails_with_a_clear_error(token_run, tmp_path):
    with pytest.raises(ray_train.TrainingFailed, match=r"failed after 0 allowed worker failure"):
        run_direct(token_run, tmp_path, "fatal", hooks=[kill_once(3, tmp_path / "fatal.marker")], max_failures=0)


def test_a_ray_train_run_resumes_what_an_in_process_run_left_in_its_folder(token_run, tmp_path):
    """Both launchers share one checkpoint folder: switching launcher continues the run, never restarts it."""
    common = ("train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2", "execution.workers=1",
              "parallel.strategy=none", "execution.threads_per_worker=1")
    first = pretrain_config(token_run, "train.steps=4", "execution.launcher=process", *common)
    launch(pretrain_job(first, tmp_path / "ckpt", tmp_path / "first.jsonl"), connect_ray=lambda: None)
    second = pretrain_config(token_run, "train.steps=6", "execution.launcher=ray_train", *common)
    result = launch(pretrain_job(second, tmp_path / "ckpt", tmp_path / "second.jsonl"), connect_ray=lambda: None)
    steps = [json.loads(x)["step"] for x in (tmp_path / "second.jsonl").read_text().splitlines()]
    assert steps == [5, 6] and result.checkpoint.endswith("/step_00000006")



def metrics_losses(text: str) -> dict[int, float]:
    """step -> loss of a metrics.jsonl's text."""
    return {m["step"]: m["loss"] for m in map(json.loads, text.splitlines()) if "loss" in m}


def test_pretrain_on_s3_checkpoints_resumes_and_exports_there_as_a_local_run_does(token_run, s3_bucket, tmp_path,
                                                                                   monkeypatch):
    """Tokens, tokenizer, run directory, checkpoints, metrics and export all on S3: the first 2 steps in
    process, the next 2 on Ray Train resuming from the S3 checkpoint; same losses and weights as one
    local 4-step run, nothing left in the working directory, and an unchanged re-run skipped."""
    tokens, tokenizer = token_shards_on_s3(token_run, s3_bucket)
    common = ("train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2", "execution.workers=1",
              "parallel.strategy=none", "execution.threads_per_worker=1")
    local_root = tmp_path / "local"
    local = stages.run_stage(stages.STAGES["pretrain"], pretrain_config(
        local_root, f"data.tokens={token_run}/tokens/output", f"tokenizer={token_run}/tokenizer/output",
        "train.steps=4", "execution.launcher=process", *common), local_root)

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    remote_root = storage.join(s3_bucket, "runs", "demo")
    on_s3 = (f"data.tokens={tokens}", f"tokenizer={tokenizer}", *common)
    first = stages.run_stage(stages.STAGES["pretrain"], pretrain_config(
        remote_root, "train.steps=2", "execution.launcher=process", *on_s3), remote_root)
    assert first.manifest["summary"]["checkpoint"] == storage.join(
        remote_root, "pretrain", "work", "checkpoints", "step_00000002")
    second_cfg = pretrain_config(remote_root, "train.steps=4", "execution.launcher=ray_train", *on_s3)
    second = stages.run_stage(stages.STAGES["pretrain"], second_cfg, remote_root)
    assert second.manifest["summary"]["checkpoint"] == storage.join(
        remote_root, "pretrain", "work", "checkpoints", "step_00000004")
    assert list(workdir.iterdir()) == [], "a run on S3 left files in the working directory"

    stage_root = storage.join(remote_root, "pretrain")
    assert metrics_losses(storage.read_text(storage.join(stage_root, "metrics.jsonl"))) == \
        metrics_losses((local_root / "pretrain" / "metrics.jsonl").read_text())
    assert storage.list_files(storage.join(stage_root, "tensorboard"))
    export = storage.join(second.output, "model")
    assert {rel for rel, _ in storage.list_files(export)} == {p.name for p in (local.output / "model").iterdir()}
    assert storage.read_bytes(storage.join(export, hf.WEIGHTS_FILE)) == \
        (local.output / "model" / hf.WEIGHTS_FILE).read_bytes()
    assert hf.load(export).config == hf.load(local.output / "model").config
    cached = {p.name for p in storage.cache_root().rglob("*.bin")}
    assert {e["path"].rsplit("/", 1)[-1] for e in shards_lib.read_manifest(tokens)["splits"]["train"]["shards"]} \
        <= cached

    again = stages.run_stage(stages.STAGES["pretrain"], second_cfg, remote_root)
    assert again.skipped and "unchanged" in again.reason


def test_proxy_on_s3_trains_and_exports_there_as_a_local_run_does(token_run, s3_bucket, tmp_path, monkeypatch):
    """The proxy stage (the unit of sweeps) with tokens, tokenizer and run directory on S3: the same
    losses and exported weights as on disk, and nothing left in the working directory."""
    tokens, tokenizer = token_shards_on_s3(token_run, s3_bucket)
    proxy = stages.STAGES["proxy"]
    raw = {"model": config_lib.read_yaml(CONFIGS.parent / "model" / "tiny.yaml"), "batch": {"seq_len": 64,
           "micro_batch_size": 4}, "train": {"steps": 3, "log_every": 1, "eval_every": 0}}

    def train(root: str, tokens: str, tokenizer: str) -> stages.StageResult:
        cfg = stages.build_config(proxy, {**raw, "data": {"tokens": tokens}, "tokenizer": tokenizer}, root)
        return stages.run_stage(proxy, cfg, root)

    local = train(str(tmp_path / "local"), f"{token_run}/tokens/output", f"{token_run}/tokenizer/output")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    remote = train(storage.join(s3_bucket, "runs", "proxy"), tokens, tokenizer)
    assert list(workdir.iterdir()) == [], "a run on S3 left files in the working directory"
    assert str(remote.output).startswith("s3://")
    assert storage.read_bytes(storage.join(str(remote.output), "model", hf.WEIGHTS_FILE)) == \
        (local.output / "model" / hf.WEIGHTS_FILE).read_bytes()

    assert metrics_losses(storage.read_text(storage.join(storage.parent(str(remote.output)), "metrics.jsonl"))) == \
        metrics_losses((local.output.parent / "metrics.jsonl").read_text()) != {}


LAYOUTS = {"in_process": ("execution.workers=1", "execution.launcher=process", "parallel.strategy=none",
                          "execution.threads_per_worker=1"),
           "tp2": ("parallel.tp=2",),
           "pp2": ("parallel.pp=2", "parallel.pipeline.microbatches=2")}


@pytest.fixture(scope="module")
def layout_runs(token_run, tmp_path_factory):
    """The same pretrain stage with only the parallel layout changed (2 Ray Train workers for tp / pp)."""
    common = ("model.tie_embeddings=false", "train.steps=4", "train.log_every=1", "train.eval_every=0",
              "train.checkpoint_every=4")
    runs = {}
    for name, layout in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        result = stages.run_stage(stages.STAGES["pretrain"], pretrain_config(token_run, *common, *layout), root)
        lines = [json.loads(x) for x in (root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {"losses": {m["step"]: m["loss"] for m in lines}, "model": hf.load(result.output / "model")}
    return runs


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tensor_and_pipeline_parallel_pretrain_on_ray_train_match_the_in_process_run(layout_runs, layout):
    reference, run = layout_runs["in_process"], layout_runs[layout]
    assert sorted(run["losses"]) == [1, 2, 3, 4]
    for step, loss in reference["losses"].items():
        assert abs(run["losses"][step] - loss) < 1e-5 * abs(loss), (step, run["losses"][step], loss)
    expected = reference["model"].model.state_dict()
    exported = run["model"].model.state_dict()  # exported from the tp / pp checkpoint by the driver
    assert exported.keys() == expected.keys()
    assert max(float((exported[k] - v).abs().max()) for k, v in expected.items()) < 5e-5

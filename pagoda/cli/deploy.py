"""`pagoda deploy`: write a Kubernetes kustomization for given models and GPUs, built on the
repository's deploy/kubernetes base, so the common cases need no YAML editing."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MAX_GPUS = 8  # one pod's GPUs; more than a node holds needs the multi-node overlay
CPU_RESOURCES = {"requests": {"cpu": "4", "memory": "8Gi"},
                 "limits": {"cpu": "8", "memory": "16Gi"}}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deploy", help="write Kubernetes manifests (a kustomization) for models and GPUs",
        description="Writes OUTPUT/ with pagoda's Kustomize base and an overlay for the "
                    "models and GPUs given; apply it with `kubectl apply -k OUTPUT`.")
    p.add_argument("model", nargs="*", default=[],
                   help="models to serve: a built-in name (pulled in the pod) or a path inside "
                        "the pod's data volume, e.g. /data/models/my-llama")
    p.add_argument("--config", metavar="YAML", help="a models file instead of MODEL arguments")
    p.add_argument("--gpus", type=int, default=1,
                   help=f"GPUs for the pod (0: the CPU image, no GPU; at most {MAX_GPUS})")
    p.add_argument("--image", help="the image (default pagoda:cuda, or pagoda:cpu with --gpus 0)")
    p.add_argument("--namespace", default="pagoda")
    p.add_argument("--storage", default="100Gi", help="size of the model-cache volume")
    p.add_argument("--output", "-o", default="pagoda-deploy", help="directory to write")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit status 2 for a bad command line, 1 for a bad models file or output directory."""
    from pagoda.errors import ConfigError
    usage = _usage_error(args)
    if usage:
        print(f"pagoda deploy: {usage}", file=sys.stderr)
        return 2
    out = Path(args.output)
    try:
        models_yaml, pull = _models_file(args.model, args.config)
        if not (DEPLOY_DIR / "base").is_dir():
            raise ConfigError(f"{DEPLOY_DIR} is missing: run pagoda deploy from a pagoda checkout")
        if out.exists() and not args.force:
            raise ConfigError(f"{out} exists (use --force to replace it)")
    except ConfigError as exc:
        print(f"pagoda deploy: {exc}", file=sys.stderr)
        return 1
    write_kustomization(out, args, models_yaml, pull)
    print(f"wrote {out}/: apply it with `kubectl apply -k {out}`")
    return 0


def _usage_error(args: argparse.Namespace) -> str | None:
    if bool(args.model) == bool(args.config):
        return "give either MODEL arguments or --config"
    if not 0 <= args.gpus <= MAX_GPUS:
        return f"--gpus must be 0..{MAX_GPUS} (several nodes: the multi-node overlay)"
    return None


def _models_file(models: list[str], config: str | None) -> tuple[str, list[str]]:
    """The models file's text (checked by the same parser `pagoda serve` uses) and the
    built-in models the pod must pull."""
    import tempfile

    import yaml

    from pagoda.errors import ConfigError
    from pagoda.fleet.spec import fleet_from_yaml
    from pagoda.models import store
    if config:
        try:
            text = Path(config).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {config}: {exc}") from None
    else:
        entries = [{"model": m, "name": Path(m).name if "/" in m else m} for m in models]
        text = yaml.safe_dump({"models": entries}, sort_keys=False)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        fleet = fleet_from_yaml(f.name)
    pull = [m.model for m in fleet.models if store.lookup(m.model) is not None]
    return text, list(dict.fromkeys(pull))


def write_kustomization(out: Path, args: argparse.Namespace, models_yaml: str,
                        pull: list[str]) -> None:
    import yaml
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(DEPLOY_DIR / "base", out / "base")
    components = []
    if args.gpus > 0:
        shutil.copytree(DEPLOY_DIR / "components", out / "components")
        components = ["components/dcgm-exporter"]
    (out / "models.yaml").write_text(models_yaml, encoding="utf-8")
    image = args.image or ("pagoda:cuda" if args.gpus else "pagoda:cpu")
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": args.namespace, "resources": ["base"],
        "configMapGenerator": [{"name": "pagoda-models", "behavior": "replace",
                                "files": ["models.yaml"]}],
        "images": [{"name": "pagoda", "newName": name, **({"newTag": tag} if tag else {})}],
        "patches": [{"target": {"kind": "Deployment", "name": "pagoda"},
                     "patch": yaml.safe_dump(_deployment_patch(args, pull))},
                    {"target": {"kind": "PersistentVolumeClaim", "name": "pagoda-data"},
                     "patch": yaml.safe_dump([{"op": "replace",
                                               "path": "/spec/resources/requests/storage",
                                               "value": args.storage}])}]}
    if components:
        kustomization["components"] = components
    header = "# Written by `pagoda deploy`; apply with `kubectl apply -k .`\n"
    (out / "kustomization.yaml").write_text(
        header + _dump(kustomization), encoding="utf-8")


def _dump(data: Any) -> str:
    """YAML with multi-line strings (the patches) written as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)
    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False)


def _deployment_patch(args: argparse.Namespace, pull: list[str]) -> list[dict[str, Any]]:
    container = "/spec/template/spec/containers/0/resources"
    ops: list[dict[str, Any]] = [
        {"op": "replace", "path": "/spec/template/spec/initContainers/0/env/0/value",
         "value": " ".join(pull)}]
    if args.gpus:
        ops.append({"op": "replace", "path": f"{container}/limits/nvidia.com~1gpu",
                    "value": args.gpus})
    else:
        ops.append({"op": "replace", "path": container, "value": CPU_RESOURCES})
    return ops
